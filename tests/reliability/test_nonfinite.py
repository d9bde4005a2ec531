"""NaN/Inf rows in a training step of every layer, on every CPU backend.

Default (check_finite=False): the non-finite rows get a code, the other rows get the
codes they get in the clean batch, and the codebook and its EMA buffers stay finite
(the fused EMA op, k-means init and dead-code restart all skip such rows).
check_finite=True: ValueError with the count, before any kernel runs.
The EMA op's own handling of non-finite rows, against the reference on every backend,
is fuzzed in test_fuzz.py (check_ema_update, bad="nan"/"inf"/"mixed").
"""
import copy
import sys

import pytest
import torch

from tests.conftest import require_backend
from vqfast.compat.taming import EMAVectorQuantizer, VectorQuantizer2
from vqfast.nn import GroupedResidualVQ, ResidualVQ, VectorQuantize

BACKENDS = ["torch", "cpu", "triton"]
B, N, D, K = 2, 12, 8, 6

LAYERS = {
    "vq_ema": lambda: VectorQuantize(dim=D, codebook_size=K, decay=0.8, threshold_ema_dead_code=2),
    "vq_kmeans": lambda: VectorQuantize(dim=D, codebook_size=K, kmeans_init=True, kmeans_iters=2,
                                        threshold_ema_dead_code=2),
    "vq_cosine_heads": lambda: VectorQuantize(dim=D, codebook_size=K, heads=2, separate_codebook_per_head=True,
                                              use_cosine_sim=True, threshold_ema_dead_code=2),
    "rvq": lambda: ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, threshold_ema_dead_code=2),
    "rvq_kmeans": lambda: ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, kmeans_init=True, kmeans_iters=2),
    "grvq": lambda: GroupedResidualVQ(dim=D, groups=2, num_quantizers=2, codebook_size=K, threshold_ema_dead_code=2),
    "taming_ema": lambda: EMAVectorQuantizer(K, D, 0.25, decay=0.9),
    "taming_vq2": lambda: VectorQuantizer2(K, D, 0.25, legacy=False),
}
TAMING = ("taming_ema", "taming_vq2")


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny layers run many times slower when two threads fight a loaded box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name, backend, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LAYERS[name]()
    if kw:
        for m in layer.modules():
            if hasattr(m, "check_finite"):
                m.check_finite = kw["check_finite"]
    for m in layer.modules():
        if isinstance(m, (VectorQuantize, VectorQuantizer2, EMAVectorQuantizer)):
            m.backend = backend
    return layer.train()


def _batch(name, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name in TAMING:
        return torch.randn(B, D, 3, 4, generator=g)  # (B, C, H, W): 24 rows
    return torch.randn(B, N, D, generator=g)


def _poison(name, x):
    """x with NaN/Inf planted in some rows; returns (bad x, (B, rows) mask of the bad rows)."""
    bad = x.clone()
    if name in TAMING:
        mask = torch.zeros(B, 3, 4, dtype=torch.bool)
        mask[0, 1, 2] = mask[1, 0, 0] = mask[1, 2, 3] = True
        bad[0, 5, 1, 2] = float("nan")
        bad[1, :, 0, 0] = float("inf")
        bad[1, 0, 2, 3] = -float("inf")
        return bad, mask.reshape(B, -1)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = mask[1, 7] = True
    bad[0, 3, 2] = float("nan")
    bad[1, 0] = float("inf")
    bad[1, 7, D - 1] = -float("inf")  # in the second group of GroupedResidualVQ only
    return bad, mask


def _step(name, layer, x):
    """One training forward (the EMA update runs inside it); the indices as (B, rows, ...)."""
    out = layer(x)
    if name in TAMING:
        return out[2][2].reshape(B, -1)
    indices = out[1]
    if name == "grvq":  # (G, B, N, Q) -> (B, N, G, Q)
        indices = indices.permute(1, 2, 0, 3)
    return indices


def _assert_state_finite(layer):
    for key, value in layer.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{key} is not finite"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_nonfinite_rows_do_not_poison_the_codebook(name, backend):
    require_backend(backend)
    x = _batch(name)
    bad, mask = _poison(name, x)
    clean_layer = _build(name, backend)
    layer = copy.deepcopy(clean_layer)
    torch.manual_seed(5)
    clean_idx = _step(name, clean_layer, x)
    torch.manual_seed(5)
    with torch.no_grad() if name == "taming_vq2" else torch.enable_grad():
        idx = _step(name, layer, bad)
    _assert_state_finite(layer)
    assert idx.shape == clean_idx.shape
    valid = idx[~mask]
    assert (valid >= 0).all()
    if "kmeans" not in name:  # k-means init sees other rows, so it starts from other codes
        assert torch.equal(idx[~mask], clean_idx[~mask])
    # the codes the bad rows got are defined indices
    assert (idx[mask] >= 0).all() and (idx[mask] < K).all()
    # training goes on from the state the bad batch left, and stays finite
    for seed in (2, 3):
        _step(name, layer, _batch(name, seed))
    _assert_state_finite(layer)


@pytest.fixture
def tripwire(monkeypatch):
    """Every kernel entry point fails the test if reached."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before check_finite refused the input")

    for module, attr in (("vqfast.ops.nearest_code", "_op_for"), ("vqfast.ops.quantize", "forward_op_for"),
                         ("vqfast.ops.codebook", "_ema_op_for")):
        monkeypatch.setattr(sys.modules[module], attr, lambda name: boom)


@pytest.mark.parametrize("name", list(LAYERS))
def test_check_finite_raises_with_the_count(name, tripwire):
    layer = _build(name, "torch", check_finite=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad, mask = _poison(name, _batch(name))
    rows = mask.numel()
    what = "z" if name in TAMING else "x"
    with pytest.raises(ValueError, match=rf"\b3 of {rows} rows of {what} are not finite"):
        layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


@pytest.mark.parametrize("name", ["vq_ema", "rvq", "grvq", "taming_ema"])
def test_check_finite_passes_finite_input(name):
    """check_finite=True changes nothing for a finite batch."""
    x = _batch(name)
    plain, checked = _build(name, "torch"), _build(name, "torch", check_finite=True)
    torch.manual_seed(5)  # dead-code restarts draw from the global generator
    a = _step(name, plain, x)
    torch.manual_seed(5)
    b = _step(name, checked, x)
    assert torch.equal(a, b)
    for (k, v), (_, w) in zip(plain.state_dict().items(), checked.state_dict().items()):
        assert torch.equal(v, w), k


def test_check_finite_layouts():
    """The rows are counted along the feature dim of each input layout."""
    x = torch.randn(2, D, 3, 5)
    x[0, 2, 1, 1] = float("nan")
    x[1, :, 2, 4] = float("nan")
    vq = VectorQuantize(dim=D, codebook_size=K, accept_image_fmap=True, check_finite=True)
    with pytest.raises(ValueError, match=r"\b2 of 30 rows"):
        vq(x)
    vq = VectorQuantize(dim=D, codebook_size=K, channel_last=False, check_finite=True)
    with pytest.raises(ValueError, match=r"\b2 of 30 rows"):
        vq(x.flatten(2))
    rvq = ResidualVQ(dim=D, num_quantizers=2, codebook_size=K, accept_image_fmap=True, check_finite=True)
    with pytest.raises(ValueError, match=r"\b2 of 30 rows"):
        rvq(x)
