"""residual_nearest_code: every backend against a float64 brute force, stage by stage, plus the op contract.

The check rebuilds the residual each stage searched from the backend's *own*
earlier choices (in the accumulation dtype, as the contract keeps it), then
applies the single-stage contract (tests/checks.py's assert_nearest) to every
stage: the reported distance is the chosen code's exact (float64) distance, the
chosen code is within tolerance of the true minimum, and the index is exact
where the float64 margin is clear.
"""
import pytest
import torch

import vqfast
from tests.checks import assert_nearest
from tests.conftest import require_backend

METRICS = ("l2", "cosine", "dot")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("torch", "cpu", "triton")


def make(n, q, k, d, dtype, metric, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, dtype=torch.float64, generator=g)
    cb = torch.randn(q, k, d, dtype=torch.float64, generator=g)
    if metric == "l2":
        # Residual-VQ-like scales: each stage's codes are smaller, like the residual they fit.
        cb = cb * (0.6 ** torch.arange(q, dtype=torch.float64)).view(q, 1, 1)
    return z.to(dtype), cb.to(dtype)


def assert_residual(z2, codebooks, metric, idx, dist):
    """Every stage's (index, distance) against the float64 residual of the backend's own choices."""
    n, q = z2.shape[0], codebooks.shape[0]
    acc = torch.float64 if z2.dtype == torch.float64 else torch.float32
    assert idx.dtype == torch.int64 and idx.shape == (n, q)
    assert dist.dtype == acc and dist.shape == (n, q)
    # The residual in the accumulation dtype, as the contract keeps it: an elementwise
    # subtraction rounds the same everywhere, so this is bit for bit the residual the
    # backend searched (a float64 one would differ by the rounding accumulated over
    # stages, which cancellation can make large next to a small r_q).
    residual = z2.to(acc)
    for s in range(q):
        assert_nearest(residual, codebooks[s], metric, idx[:, s], dist[:, s])
        residual = residual - codebooks[s].to(acc)[idx[:, s]]


def run(backend, z, codebooks, metric):
    idx, dist = vqfast.residual_nearest_code(z, codebooks, metric=metric, backend=backend)
    assert idx.shape == (*z.shape[:-1], codebooks.shape[0]) and dist.shape == idx.shape
    assert_residual(z.reshape(-1, z.shape[-1]).to(torch.promote_types(z.dtype, codebooks.dtype)),
                    codebooks.to(torch.promote_types(z.dtype, codebooks.dtype)), metric,
                    idx.reshape(-1, codebooks.shape[0]), dist.reshape(-1, codebooks.shape[0]))
    return idx, dist


GRID_QD = [(1, 1), (2, 3), (8, 8), (1, 64), (8, 64), (2, 130)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid(backend, metric, dtype):
    require_backend(backend)
    # Every Q in {1, 2, 8} and every D in {1, 3, 8, 64, 130} (both CPU paths: D <= 16 is the
    # micro-kernel, larger D the BLAS tile), without the full product.
    for q, d in GRID_QD:
        run(backend, *make(120, q, 37, d, dtype, metric, seed=q * 1000 + d), metric)


@pytest.mark.parametrize("metric", METRICS)
def test_many_rows_and_code_blocks_cpu(metric):
    """Several row blocks per thread and codes past the CPU kernel's 512-code tile, both D paths."""
    require_backend("cpu")
    for d in (8, 64):
        run("cpu", *make(1000, 3, 1100, d, torch.float32, metric, seed=d), metric)


# The Triton interpreter executes every block in numpy: keep these tiny.
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_interpreter(metric, dtype):
    require_backend("triton")
    for n, q, k, d in [(9, 1, 5, 1), (9, 2, 7, 3), (5, 8, 4, 8), (6, 2, 5, 64), (4, 2, 3, 130)]:
        run("triton", *make(n, q, k, d, dtype, metric, seed=n + q + k + d), metric)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_sequential_nearest_code(backend):
    """float64 l2: one fused call equals Q nearest_code calls with the residual carried exactly."""
    require_backend(backend)
    n, k = (40, 9) if backend == "triton" else (300, 200)
    z, cb = make(n, 8, k, 24, torch.float64, "l2", seed=7)
    idx, dist = vqfast.residual_nearest_code(z, cb, backend=backend)
    residual = z.clone()
    for s in range(cb.shape[0]):
        i, d = vqfast.nearest_code(residual, cb[s], backend=backend)
        assert torch.equal(idx[:, s], i), f"stage {s} differs"
        torch.testing.assert_close(dist[:, s], d, rtol=1e-12, atol=1e-12)
        residual = residual - cb[s][i]


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    require_backend(backend)
    for metric in METRICS:
        # K = 1: every stage picks code 0
        z, cb = make(11, 3, 1, 5, torch.float32, metric)
        idx, dist = run(backend, z, cb, metric)
        assert (idx == 0).all()
        # N = 0
        idx, dist = vqfast.residual_nearest_code(torch.randn(0, 5), cb, metric=metric, backend=backend)
        assert idx.shape == (0, 3) and dist.shape == (0, 3) and dist.dtype == torch.float32
        # batched (2, 0, D)
        idx, dist = vqfast.residual_nearest_code(torch.randn(2, 0, 5), cb, metric=metric, backend=backend)
        assert idx.shape == (2, 0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_noncontiguous(backend):
    require_backend(backend)
    z = torch.randn(3, 16, 5).transpose(1, 2)  # (3, 5, 16), not contiguous
    assert not z.is_contiguous()
    cb = torch.randn(16, 4, 6).permute(1, 2, 0)  # (4, 6, 16), not contiguous
    assert not cb.is_contiguous()
    for metric in METRICS:
        idx, dist = run(backend, z, cb, metric)
        assert idx.shape == (3, 5, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend):
    require_backend(backend)
    base = torch.randn(2, 5, 16)
    cb = torch.cat([base, base, base], dim=1)  # every code of every stage appears three times
    z = base[0, torch.tensor([4, 0, 2, 2])] + 0.01 * torch.randn(4, 16)
    for metric in METRICS:
        idx, _ = vqfast.residual_nearest_code(z, cb, metric=metric, backend=backend)
        assert (idx < 5).all(), f"{metric}: tie not broken to the lowest index: {idx.tolist()}"


def test_backends_agree():
    """The fused CPU kernel and the reference choose the same codes (beyond near-ties)."""
    require_backend("cpu")
    z, cb = make(2000, 4, 700, 64, torch.float32, "l2", seed=3)
    i_cpu, d_cpu = vqfast.residual_nearest_code(z, cb, backend="cpu")
    i_ref, d_ref = vqfast.residual_nearest_code(z, cb, backend="torch")
    assert (i_cpu == i_ref).all(dim=1).float().mean() > 0.99
    same = (i_cpu == i_ref).all(dim=1)
    torch.testing.assert_close(d_cpu[same], d_ref[same], rtol=1e-5, atol=1e-3)


def test_mixed_dtypes_promote():
    z, cb = torch.randn(50, 16).bfloat16(), torch.randn(3, 20, 16)
    idx, dist = vqfast.residual_nearest_code(z, cb)
    assert dist.dtype == torch.float32
    assert_residual(z.float(), cb, "l2", idx, dist)


def test_not_differentiable_and_inputs_detached():
    z = torch.randn(10, 8, requires_grad=True)
    cb = torch.randn(2, 6, 8, requires_grad=True)
    idx, dist = vqfast.residual_nearest_code(z, cb)
    assert not idx.requires_grad and not dist.requires_grad


def test_default_backend_on_cpu_is_the_extension():
    require_backend("cpu")
    from vqfast import registry
    assert registry.resolve(None, torch.device("cpu"), "residual_nearest_code") == "cpu"


# ---- op contract -----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend):
    require_backend(backend)
    z, cb = torch.randn(10, 8), torch.randn(2, 16, 8)
    cases = [
        ((z, torch.randn(16, 8)), ValueError, "codebooks must be 3-D"),
        ((z, torch.randn(0, 16, 8)), ValueError, "at least one stage"),
        ((z, torch.randn(2, 0, 8)), ValueError, "at least one code"),
        ((torch.randn(10, 0), torch.randn(2, 16, 0)), ValueError, "D >= 1"),
        ((torch.randn(10, 7), cb), ValueError, "last dimension must equal the codebooks' D"),
        ((torch.randint(0, 5, (10, 8)), cb), TypeError, "z must be float16"),
        ((z, torch.randint(0, 5, (2, 16, 8))), TypeError, "codebooks must be float16"),
        ((z, cb.to("meta")), ValueError, "same device"),
        ((torch.tensor(1.0), cb), ValueError, "0-d"),
        (([1.0] * 8, cb), TypeError, "z must be a torch.Tensor"),
        ((z, [[[1.0] * 8]]), TypeError, "codebooks must be a torch.Tensor"),
    ]
    for (zz, cc), exc, msg in cases:
        with pytest.raises(exc, match=msg):
            vqfast.residual_nearest_code(zz, cc, backend=backend)
    with pytest.raises(ValueError, match="metric must be one of"):
        vqfast.residual_nearest_code(z, cb, metric="euclid", backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        vqfast.residual_nearest_code(z, cb, backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    require_backend(backend)
    from vqfast.ops.residual import _op_for
    op = _op_for(backend)
    for metric in (0, 1, 2):
        dtype = torch.float64 if metric else torch.float32
        z = torch.randn(13, 24, dtype=dtype)
        cb = torch.randn(3, 7, 24, dtype=dtype)
        torch.library.opcheck(op, (z, cb, metric))


def test_torch_compile_fullgraph():
    require_backend("cpu")

    def encode(z, cb):
        idx, dist = vqfast.residual_nearest_code(z, cb, metric="l2")
        zq = sum(cb[s][idx[..., s]] for s in range(cb.shape[0]))
        return zq, dist.sum(-1).mean()

    compiled = torch.compile(encode, fullgraph=True, backend="aot_eager")
    z, cb = torch.randn(4, 10, 16), torch.randn(3, 30, 16)
    zq, loss = compiled(z, cb)
    zq_ref, loss_ref = encode(z, cb)
    torch.testing.assert_close(zq, zq_ref)
    torch.testing.assert_close(loss, loss_ref)
