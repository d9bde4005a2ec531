"""quantize and ema_update_ on a real GPU: the cuda and triton backends against
the torch backend (vqfast/reference) on the same CUDA tensors.

Marked `gpu`: skipped without a CUDA device (CI has none); run by `make gpu-check`.
"""
import pytest
import torch

import vqfast
from tests.checks import exact_distances, tolerance
from vqfast.reference import ema as ref_ema
from vqfast.reference import quantize as ref_q
from vqfast.reference.nearest_code import METRICS as MET
from vqfast.reference.quantize import ESTIMATORS as EST

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ("cuda", "triton")
METRICS = ("l2", "cosine", "dot")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# (N, K, D): tiny, ragged tiles, D > 128 (several passes per row), many rows per code,
# few row blocks with many codes (the split search path), many row blocks.
SHAPES = [(1, 1, 1), (7, 3, 3), (300, 64, 16), (257, 1000, 64), (100, 33, 200), (5000, 4, 32),
          (7, 16384, 512), (20000, 1024, 64)]


def _backend(name: str, op: str = "quantize") -> str:
    st = vqfast.backends()[name]
    if not (st.available and "cuda" in st.devices):
        pytest.fail(f"backend {name!r} must run on a GPU machine: {st.reason}")
    why = vqfast.registry.op_reason(name, op)
    if why:
        pytest.skip(why)
    return name


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    return _backend(request.param)


@pytest.fixture(params=GPU_BACKENDS)
def ema_backend(request):
    return _backend(request.param, "ema_update_")


def _inputs(n, k, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(n, d, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    cb = (torch.randn(k, d, device="cuda", generator=g, dtype=torch.float64) * 0.7).to(dtype)
    return z, cb


def _same_or_near_tie(z, cb, metric, idx, idx_ref):
    """Indices equal, or (near-ties) the chosen codes are as near as the reference's."""
    if torch.equal(idx, idx_ref):
        return
    a = exact_distances(z, cb[idx], metric)
    b = exact_distances(z, cb[idx_ref], metric)
    assert ((a - b).abs() <= tolerance(z, cb, metric)).all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(backend, metric, dtype):
    for n, k, d in SHAPES:
        z, cb = _inputs(n, k, d, dtype)
        r = vqfast.quantize(z, cb, metric=metric, backend=backend)
        want = vqfast.quantize(z, cb, metric=metric, backend="torch")
        assert r.indices.dtype == torch.int64 and r.z_q.dtype == dtype
        assert int(r.indices.min()) >= 0 and int(r.indices.max()) < k
        _same_or_near_tie(z, cb, metric, r.indices, want.indices)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        ep = ref_q.normalize(cb.to(acc)) if metric == "cosine" else cb.to(acc)
        if metric == "cosine":
            torch.testing.assert_close(r.z_q, ep[r.indices].to(dtype), rtol=TOL[dtype], atol=TOL[dtype])
        else:
            assert torch.equal(r.z_q, cb[r.indices]), "l2/dot z_q must be an exact copy of the code"
        zp = ref_q.normalize(z.to(acc)) if metric == "cosine" else z.to(acc)
        loss = ((zp - ep[r.indices]) ** 2).mean()
        for got in (r.commit_loss, r.codebook_loss):
            assert got.dtype == acc and got.dim() == 0
            torch.testing.assert_close(got, loss, rtol=TOL[dtype], atol=1e-6)


def _grads(backend, z, cb, metric, estimator, through, gq, gc, gb, deterministic):
    zr, cbr = z.clone().requires_grad_(), cb.clone().requires_grad_()
    r = vqfast.quantize(zr, cbr, metric=metric, estimator=estimator, codebook_grad_through_output=through,
                        backend=backend)
    loss = (r.z_q * gq).sum() + gc * r.commit_loss + gb * r.codebook_loss
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)  # read by the backward
    try:
        gz, gcb = torch.autograd.grad(loss, (zr, cbr))
    finally:
        torch.use_deterministic_algorithms(prev)
    return r.indices, gz, gcb


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("estimator", ("ste", "rotation"))
@pytest.mark.parametrize("through", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_matches_reference(backend, metric, estimator, through, deterministic):
    for dtype in (torch.float64, torch.float32):
        for n, k, d in [(7, 3, 3), (300, 64, 16), (257, 1000, 64), (100, 33, 200), (5000, 4, 32)]:
            z, cb = _inputs(n, k, d, dtype, seed=n + k + d)
            gq = torch.randn(n, d, device="cuda", dtype=dtype)
            gc, gb = 0.7, 1.3
            idx, gz, gcb = _grads(backend, z, cb, metric, estimator, through, gq, gc, gb, deterministic)
            # The reference backward, in float64, at the backend's indices.
            f64 = torch.float64
            wz, wcb = ref_q.quantize_backward(gq.to(f64), torch.tensor(gc, dtype=f64, device="cuda"),
                                              torch.tensor(gb, dtype=f64, device="cuda"), z.to(f64), cb.to(f64),
                                              idx, MET[metric], EST[estimator], through)
            tol = TOL[dtype]
            for got, want in ((gz, wz), (gcb, wcb)):
                assert got.dtype == dtype
                torch.testing.assert_close(got.to(f64), want, rtol=tol, atol=tol * max(float(want.abs().max()), 1.0))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_backward_half(backend, dtype):
    z, cb = _inputs(2000, 100, 64, dtype)
    gq = torch.randn(2000, 64, device="cuda").to(dtype)
    for metric in METRICS:
        idx, gz, gcb = _grads(backend, z, cb, metric, "rotation", True, gq, 0.7, 1.3, False)
        f64 = torch.float64
        wz, wcb = ref_q.quantize_backward(gq.to(f64), torch.tensor(0.7, dtype=f64, device="cuda"),
                                          torch.tensor(1.3, dtype=f64, device="cuda"), z.to(f64), cb.to(f64), idx,
                                          MET[metric], EST["rotation"], True)
        tol = TOL[dtype]
        for got, want in ((gz, wz), (gcb, wcb)):
            torch.testing.assert_close(got.to(f64), want, rtol=tol, atol=tol * max(float(want.abs().max()), 1.0))


@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_backward_is_bit_identical(backend, metric):
    """Deterministic mode: two backward passes give bit-identical gradients, with
    many rows per code (the order of a float sum matters there)."""
    z, cb = _inputs(100000, 16, 64, torch.float32)
    gq = torch.randn_like(z)
    runs = [_grads(backend, z, cb, metric, "rotation", True, gq, 0.7, 1.3, True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][2], runs[1][2])
    # ... and the same values as the atomics path, up to rounding.
    _, gz, gcb = _grads(backend, z, cb, metric, "rotation", True, gq, 0.7, 1.3, False)
    torch.testing.assert_close(gz, runs[0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gcb, runs[0][2], rtol=1e-4, atol=1e-4 * float(gcb.abs().max()))


def test_forward_is_bit_identical(backend):
    """The loss is reduced in a fixed order: the same inputs give the same bits."""
    z, cb = _inputs(70000, 1024, 64, torch.float32)
    a = vqfast.quantize(z, cb, backend=backend)
    b = vqfast.quantize(z, cb, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_large_index_offsets(backend):
    """N x K beyond 2^31 (N=262144, K=16384): every row written, z_q the chosen code."""
    z, cb = _inputs(262144, 16384, 8, torch.float32)
    r = vqfast.quantize(z, cb, backend=backend)
    assert int(r.indices.min()) >= 0 and int(r.indices.max()) < cb.shape[0]
    assert torch.equal(r.z_q, cb[r.indices])
    torch.testing.assert_close(r.commit_loss, ((z - cb[r.indices]) ** 2).mean(), rtol=1e-4, atol=0)
    rows = torch.randint(0, z.shape[0], (2048,), device="cuda")
    want, _ = vqfast.nearest_code(z[rows], cb, backend="torch")
    _same_or_near_tie(z[rows], cb, "l2", r.indices[rows], want)


def test_opcheck(backend):
    from vqfast.ops.quantize import backward_op_for, forward_op_for
    z, cb = _inputs(20, 11, 8, torch.float64)
    for metric in (0, 1, 2):
        for est in (0, 1):
            torch.library.opcheck(forward_op_for(backend), (z, cb, metric, est, True))
            idx = vqfast.nearest_code(z, cb, backend="torch")[0]
            for deterministic in (False, True):
                args = (torch.randn(20, 8, dtype=torch.float64, device="cuda"),
                        torch.tensor(0.3, dtype=torch.float64, device="cuda"),
                        torch.tensor(1.1, dtype=torch.float64, device="cuda"), z, cb, idx, metric, est, True,
                        deterministic)
                torch.library.opcheck(backward_op_for(backend), args)


def _ema_state(k, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    cb = torch.randn(k, d, device="cuda", generator=g, dtype=dtype)
    cs = torch.rand(k, device="cuda", generator=g, dtype=dtype) * 3
    return cb, cs, cb * cs.unsqueeze(-1)


@pytest.mark.parametrize("zdtype", DTYPES, ids=str)
def test_ema_matches_reference(ema_backend, zdtype):
    for n, k, d in [(0, 4, 3), (1, 1, 1), (500, 64, 8), (3000, 300, 64), (20000, 16, 200), (4000, 5000, 32)]:
        bufdtype = torch.float64 if zdtype == torch.float64 else torch.float32
        state = _ema_state(k, d, bufdtype, seed=n + k)
        z = torch.randn(n, d, device="cuda").to(zdtype)
        if n > 10:
            z[3, d // 2] = float("nan")
            z[7] = float("inf")
        idx = torch.randint(0, k, (n,), device="cuda")
        mine = [t.clone() for t in state]
        ref = [t.clone() for t in state]
        vqfast.ema_update_(*mine, z, idx, decay=0.8, eps=1e-5, backend=ema_backend)
        ref_ema.ema_update_(*ref, z, idx, 0.8, 1e-5)
        tol = 1e-12 if bufdtype == torch.float64 else 2e-5
        for a, b in zip(mine, ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("deterministic", [True, False])
def test_ema_bit_identical(ema_backend, deterministic):
    """Two EMA steps from the same state give the same bits (many rows per code):
    with deterministic algorithms on for every backend; the cuda kernel always
    sums in a fixed order (its schema has no flag), so there without them too."""
    if not deterministic and ema_backend != "cuda":
        pytest.skip("only the cuda EMA is deterministic without use_deterministic_algorithms")
    state = _ema_state(8, 32, torch.float32)
    z, idx = torch.randn(200000, 32, device="cuda"), torch.randint(0, 8, (200000,), device="cuda")
    runs = []
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for _ in range(2):
            s = [t.clone() for t in state]
            vqfast.ema_update_(*s, z, idx, decay=0.5, backend=ema_backend)
            runs.append(s)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
