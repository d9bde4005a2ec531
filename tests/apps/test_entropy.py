"""Entropy coding with the prior: exact round trips, rate close to the model's information
content, the raw baseline, and errors."""
import functools
import math

import numpy as np
import pytest
import torch

pytest.importorskip("constriction")

from vqfast import entropy  # noqa: E402
from vqfast.models.prior import CodePrior  # noqa: E402

K, L = 16, 20


@functools.lru_cache(maxsize=None)  # trained once per session; tests that change it copy it
def _trained_prior(num_classes):
    torch.manual_seed(0)
    p = CodePrior(K, L, dim=32, depth=1, heads=2, num_classes=num_classes)
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    start = torch.randint(0, K, (64, 1))
    data = (start + torch.arange(L)) % K
    cond = torch.zeros(64, dtype=torch.long) if num_classes else None
    for _ in range(30):
        opt.zero_grad()
        p.loss(data, cond).backward()
        opt.step()
    return p.eval(), data


def trained_prior(num_classes=0):
    import copy

    p, data = _trained_prior(num_classes)
    return copy.deepcopy(p), data


@pytest.mark.parametrize("num_classes", [0, 2])
def test_round_trip_exact_and_rate(num_classes):
    p, data = trained_prior(num_classes)
    cond = 0 if num_classes else None
    for codes in (data[0], data[7], torch.randint(0, K, (L,))):
        words = entropy.encode_codes(codes, p, cond)
        assert words.dtype == np.uint32
        back = entropy.decode_codes(words, p, cond)
        assert torch.equal(back, codes)
        # the coded size is the information content under the model, up to the coder's overhead
        info = p.bits_per_code(codes[None], None if cond is None else torch.tensor([cond])) * L
        assert len(words) * 32 <= info + 64
    # structured sequences compress well below the raw ceil(log2 K) bits per code
    assert len(entropy.encode_codes(data[0], p, cond)) * 32 < entropy.raw_bits(K, L)


def test_model_hash_changes_with_weights():
    p, _ = trained_prior()
    h = entropy.model_hash(p)
    assert len(h) == 8 and h == entropy.model_hash(p)
    with torch.no_grad():
        p.head.bias[0] += 1e-3
    assert entropy.model_hash(p) != h


def test_bad_codes():
    p, _ = trained_prior()
    with pytest.raises(ValueError, match="seq_len"):
        entropy.encode_codes(torch.zeros(L - 1, dtype=torch.long), p)
    with pytest.raises(ValueError, match="lie in"):
        entropy.encode_codes(torch.full((L,), K), p)


def test_raw_bits():
    assert entropy.raw_bits(1024, 10) == 100
    assert entropy.raw_bits(1000, 10) == 100
    assert entropy.raw_bits(2, 3) == 3
    assert entropy.raw_bits(1, 3) == 3
    assert entropy.raw_bits(K, L) == L * math.ceil(math.log2(K))
