"""nearest_code: every backend against the float64 definition, plus the op contract."""
import itertools

import pytest
import torch

import vqfast
from tests.checks import assert_nearest
from tests.conftest import require_backend

METRICS = ("l2", "cosine", "dot")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def make(n, k, d, dtype, metric):
    z = torch.randn(n, d, dtype=torch.float64)
    cb = torch.randn(k, d, dtype=torch.float64)
    if metric == "l2":  # codes near the data, so distances are not all dominated by norms
        cb = cb * 0.5 + 0.25
    return z.to(dtype), cb.to(dtype)


def run(backend, z, cb, metric):
    idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
    assert_nearest(z.reshape(-1, z.shape[-1]), cb, metric, idx.reshape(-1), dist.reshape(-1))
    return idx, dist


# The grid: N in {0,1,7,1000,70000}, K in {1,3,1024,16384}, D in {1,3,64,100,256,512}.
# Small and medium combinations run in full for the native and reference backends;
# the large ones below cover each big extent at least once.
SMALL = list(itertools.product((0, 1, 7, 1000), (1, 3, 1024), (1, 3, 64, 100)))
LARGE = [(70000, 1024, 64), (1000, 16384, 64), (7, 16384, 512), (1000, 1024, 256), (1000, 3, 512),
         (70000, 3, 3), (1, 16384, 256), (1000, 16384, 8)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_small(backend, metric, dtype):
    require_backend(backend)
    for n, k, d in SMALL:
        run(backend, *make(n, k, d, dtype, metric), metric)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("n,k,d", LARGE)
@pytest.mark.parametrize("metric", METRICS)
def test_grid_large(backend, n, k, d, metric):
    require_backend(backend)
    dtype = torch.float32 if (n, k, d) != (70000, 1024, 64) else torch.bfloat16
    run(backend, *make(n, k, d, dtype, metric), metric)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_large_dtypes_cpu(dtype):
    require_backend("cpu")
    for n, k, d in [(1000, 16384, 64), (7, 1024, 512), (300, 1024, 256)]:
        run("cpu", *make(n, k, d, dtype, "l2"), "l2")


@pytest.mark.slow
@pytest.mark.parametrize("n,k,d", [(70000, 16384, 64), (70000, 16384, 512), (70000, 1024, 512)])
def test_grid_huge_cpu(n, k, d):
    require_backend("cpu")
    run("cpu", *make(n, k, d, torch.float32, "l2"), "l2")


# The Triton interpreter executes every block in numpy: keep these small.
TRITON_SHAPES = [(0, 3, 8), (1, 1, 1), (7, 3, 3), (37, 130, 64), (64, 64, 100), (200, 70, 1), (5, 300, 256)]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_interpreter(metric, dtype):
    require_backend("triton")
    for n, k, d in TRITON_SHAPES:
        run("triton", *make(n, k, d, dtype, metric), metric)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_batched_noncontiguous(backend):
    require_backend(backend)
    z = torch.randn(3, 64, 5).transpose(1, 2)  # (3, 5, 64), not contiguous
    assert not z.is_contiguous()
    cb = torch.randn(50, 64)
    for metric in METRICS:
        idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
        assert idx.shape == (3, 5) and dist.shape == (3, 5)
        assert_nearest(z.reshape(-1, 64), cb, metric, idx.reshape(-1), dist.reshape(-1))
    cb_t = torch.randn(64, 50).T  # non-contiguous codebook
    idx, dist = vqfast.nearest_code(z, cb_t, backend=backend)
    assert_nearest(z.reshape(-1, 64), cb_t, "l2", idx.reshape(-1), dist.reshape(-1))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_ties_go_to_lowest_index(backend):
    require_backend(backend)
    base = torch.randn(5, 16)
    cb = torch.cat([base, base, base])  # every code appears three times
    z = base[torch.tensor([4, 0, 2, 2])] + 0.01 * torch.randn(4, 16)
    for metric in METRICS:
        idx, _ = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
        assert (idx < 5).all(), f"{metric}: tie not broken to the lowest index: {idx.tolist()}"
    # exact duplicates across code-block boundaries (the CPU kernel tiles codes by 512)
    cb = torch.randn(1500, 32)
    cb[1100] = cb[3]
    cb[520] = cb[3]
    idx, _ = vqfast.nearest_code(cb[3:4].clone(), cb, backend=backend)
    assert idx.tolist() == [3]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_large_magnitude_half(backend):
    """float16 inputs whose squared norms overflow float16 still pick the right code."""
    require_backend(backend)
    cb = (torch.randn(64, 32) * 200).half()  # ||e||^2 ~ 1.3e6 > 65504
    z = (cb.float()[torch.randint(0, 64, (100,))] + torch.randn(100, 32)).half()
    idx, dist = vqfast.nearest_code(z, cb, backend=backend)
    assert_nearest(z, cb, "l2", idx, dist)


def test_backends_agree_with_reference_exactly_on_clear_margins():
    """The native CPU kernel and the reference choose the same codes (beyond near-ties)."""
    require_backend("cpu")
    z, cb = make(5000, 2048, 64, torch.float32, "l2")
    i_cpu, d_cpu = vqfast.nearest_code(z, cb, backend="cpu")
    i_ref, d_ref = vqfast.nearest_code(z, cb, backend="torch")
    from tests.checks import exact_distances, tolerance
    tol = tolerance(z, cb, "l2")
    a, b = exact_distances(z, cb[i_cpu], "l2"), exact_distances(z, cb[i_ref], "l2")
    assert ((a - b).abs() <= tol).all()
    assert (i_cpu == i_ref).float().mean() > 0.999
    torch.testing.assert_close(d_cpu, d_ref, rtol=1e-5, atol=1e-3)


# ---- op contract -----------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_bad_input_names_the_argument(backend):
    require_backend(backend)
    z, cb = torch.randn(10, 8), torch.randn(16, 8)
    cases = [
        ((torch.randn(10, 8), torch.randn(4, 8, 3)), ValueError, "codebook must be 2-D"),
        ((torch.randn(10, 7), cb), ValueError, "last dimension must equal the codebook's D"),
        ((torch.randint(0, 5, (10, 8)), cb), TypeError, "z must be float16"),
        ((z, torch.randint(0, 5, (16, 8))), TypeError, "codebook must be float16"),
        ((z.to(torch.complex64), cb), TypeError, "z must be float16"),
        ((z, torch.randn(0, 8)), ValueError, "at least one code"),
        ((z, cb.to("meta")), ValueError, "same device"),
        ((torch.tensor(1.0), cb), ValueError, "0-d"),
        (([1.0] * 8, cb), TypeError, "z must be a torch.Tensor"),
    ]
    for (zz, cc), exc, msg in cases:
        with pytest.raises(exc, match=msg):
            vqfast.nearest_code(zz, cc, backend=backend)
    with pytest.raises(ValueError, match="metric must be one of"):
        vqfast.nearest_code(z, cb, metric="euclid", backend=backend)


def test_bad_backend():
    z, cb = torch.randn(10, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        vqfast.nearest_code(z, cb, backend="numpy")
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="backend 'cuda'"):
            vqfast.nearest_code(z, cb, backend="cuda")


def test_default_backend_on_cpu_is_the_extension():
    require_backend("cpu")
    from vqfast import registry
    assert registry.resolve(None, torch.device("cpu"), "nearest_code") == "cpu"


def test_mixed_dtypes_promote():
    z, cb = torch.randn(50, 16).bfloat16(), torch.randn(20, 16)
    idx, dist = vqfast.nearest_code(z, cb)
    assert dist.dtype == torch.float32
    assert_nearest(z.float(), cb, "l2", idx, dist)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_opcheck(backend):
    require_backend(backend)
    from vqfast.ops.nearest_code import _op_for
    op = _op_for(backend)
    for metric in (0, 1, 2):
        z = torch.randn(33, 24, dtype=torch.float64)
        cb = torch.randn(17, 24, dtype=torch.float64)
        torch.library.opcheck(op, (z, cb, metric))
        # With grads: opcheck's aot-dispatch harness sums every output into one
        # accumulator and cannot add a float distance to an int64 index, so the
        # autograd path is checked by the registration test here and by
        # gradcheck / compiled backward below.
        torch.library.opcheck(op, (z.requires_grad_(), cb.requires_grad_(), metric),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("metric", METRICS)
def test_distance_gradients(backend, metric):
    require_backend(backend)
    z = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)

    def f(z, cb):
        return vqfast.nearest_code(z, cb, metric=metric, backend=backend)[1]

    torch.autograd.gradcheck(f, (z, cb))


def test_torch_compile_fullgraph():
    require_backend("cpu")

    def step(z, cb):
        idx, dist = vqfast.nearest_code(z, cb, metric="l2")
        return cb[idx], dist.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z, cb = torch.randn(40, 16), torch.randn(30, 16)
    zq, loss = compiled(z, cb)
    zq_ref, loss_ref = step(z, cb)
    torch.testing.assert_close(zq, zq_ref)
    torch.testing.assert_close(loss, loss_ref)


def test_torch_compile_inductor():
    require_backend("cpu")

    @torch.compile(fullgraph=True)
    def f(z, cb):
        return vqfast.nearest_code(z, cb)[0]

    z, cb = torch.randn(40, 16), torch.randn(30, 16)
    assert torch.equal(f(z, cb), vqfast.nearest_code(z, cb)[0])


def test_cpu_dispatcher_gemm_path(monkeypatch):
    """The CPU kernel's fallback when torch's BLAS symbols are not found: tiles through aten::mm."""
    require_backend("cpu")
    monkeypatch.setenv("VQFAST_CPU_GEMM", "dispatcher")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for metric in METRICS:
            run("cpu", *make(700, 1100, 40, dtype, metric), metric)
