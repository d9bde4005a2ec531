"""CodePrior: causality, the key/value-cache path against the full forward, sampling filters,
class conditioning, bad input, and that training lowers the loss."""
import math

import pytest
import torch

from vqfast.models.prior import CodePrior, filter_logits

K, L = 32, 12


def prior(**kw):
    torch.manual_seed(0)
    return CodePrior(K, L, dim=32, depth=2, heads=4, **kw).eval()


def test_shapes_and_causality():
    p = prior()
    codes = torch.randint(0, K, (3, L))
    logits = p(codes)
    assert logits.shape == (3, L, K)
    t = 5
    changed = codes.clone()
    changed[:, t] = (changed[:, t] + 1) % K
    other = p(changed)
    # position t+1 is the first to see code t
    torch.testing.assert_close(other[:, :t + 1], logits[:, :t + 1])
    assert not torch.allclose(other[:, t + 1], logits[:, t + 1])


@pytest.mark.parametrize("num_classes", [0, 3])
def test_cached_steps_equal_full_forward(num_classes):
    p = prior(num_classes=num_classes)
    codes = torch.randint(0, K, (2, L))
    cond = torch.tensor([2, 0]) if num_classes else None
    full = p(codes, cond)
    cache = p.new_cache(2)
    prev = None
    for t in range(L):
        step = p.step_logits(prev, t, cache, cond, batch=2)
        torch.testing.assert_close(step, full[:, t], rtol=1e-4, atol=1e-5)
        prev = codes[:, t]


def test_sample_cache_and_no_cache_agree():
    p = prior()
    a = p.sample(4, generator=torch.Generator().manual_seed(3))
    b = p.sample(4, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert a.shape == (4, L) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < K
    assert (a == b).float().mean() > 0.9  # same draws unless a probability differs by rounding at a boundary


def test_filter_logits_against_brute_force():
    torch.manual_seed(1)
    logits = torch.randn(5, K)
    kept = filter_logits(logits, top_k=4).isfinite()
    assert torch.equal(kept.sum(-1), torch.full((5,), 4))
    assert torch.equal(kept, logits >= logits.topk(4, -1).values[:, -1:])
    top_p = 0.7
    kept = filter_logits(logits, top_p=top_p).isfinite()
    for row, k in zip(logits, kept):  # smallest set of most likely codes whose mass reaches top_p
        probs, order = row.softmax(-1).sort(descending=True)
        n = int((probs.cumsum(0) < top_p).sum()) + 1
        assert set(order[:n].tolist()) == set(k.nonzero().flatten().tolist())
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    for bad in (dict(temperature=0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            filter_logits(logits, **bad)


def test_top_k_one_is_greedy():
    p = prior()
    codes = p.sample(2, top_k=1)
    logits = p(codes)
    assert torch.equal(codes, logits.argmax(-1))


def test_bad_input():
    p = prior()
    with pytest.raises(TypeError, match="codes"):
        p(torch.rand(2, L))
    with pytest.raises(ValueError, match="codes must lie"):
        p(torch.full((2, L), K))
    with pytest.raises(ValueError, match="shape"):
        p(torch.zeros(2, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        p(torch.zeros(2, L, dtype=torch.long), torch.tensor([0, 1]))
    pc = prior(num_classes=2)
    with pytest.raises(ValueError, match="cond"):
        pc(torch.zeros(2, L, dtype=torch.long))
    with pytest.raises(ValueError, match="class labels"):
        pc(torch.zeros(2, L, dtype=torch.long), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="num_codes"):
        CodePrior(0, L)


def test_training_lowers_loss_below_uniform():
    """Sequences with structure (each code = previous + 1 mod K): the prior learns it."""
    torch.manual_seed(0)
    p = CodePrior(K, L, dim=32, depth=1, heads=2).train()
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    start = torch.randint(0, K, (64, 1))
    data = (start + torch.arange(L)) % K
    first = p.loss(data).item()
    for _ in range(60):
        opt.zero_grad()
        loss = p.loss(data)
        loss.backward()
        opt.step()
    assert abs(first - math.log(K)) < 0.5  # starts near uniform
    assert loss.item() < 0.5 * first
    p.eval()
    assert p.bits_per_code(data) < 0.5 * math.log2(K)
