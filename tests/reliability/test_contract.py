"""The README's input contract, line by line, for every public op on every CPU backend.

tests/ops already checks the error messages of nearest_code (and a few of
quantize / ema_update_ / kmeans / codebook_stats) without proving that the
validation runs before the kernel; here every op gets the same bad inputs with
the kernels replaced by a tripwire, and the edge cases (empty input, K = 1,
D = 1, D = 4096, non-finite rows, float16 overflow) run on every backend.
"""
import os
import sys

import pytest
import torch

import vqfast
from tests.checks import assert_nearest, exact_distances, tolerance
from tests.conftest import cpu_backends, require_backend
from vqfast.reference import ema as ema_reference

BACKENDS = ["torch", "cpu", "triton"]
METRICS = ("l2", "cosine", "dot")
NC_MOD = sys.modules["vqfast.ops.nearest_code"]
Q_MOD = sys.modules["vqfast.ops.quantize"]
CB_MOD = sys.modules["vqfast.ops.codebook"]


def test_every_cpu_backend_is_covered():
    assert set(cpu_backends()) == set(BACKENDS)


@pytest.fixture
def tripwire(monkeypatch):
    """Replaces every backend kernel with one that fails the test if it is reached."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was validated")

    monkeypatch.setattr(NC_MOD, "_op_for", lambda name: boom)
    monkeypatch.setattr(Q_MOD, "forward_op_for", lambda name: boom)
    monkeypatch.setattr(CB_MOD, "_ema_op_for", lambda name: boom)
    monkeypatch.setattr(CB_MOD, "nearest_code", boom)  # kmeans' assignment step
    monkeypatch.setattr(CB_MOD.reference, "code_sums", boom)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tripwire_is_armed(tripwire, backend):
    """Valid input does reach the (patched) kernels, so the tests below prove validation comes first."""
    require_backend(backend)
    cb, cs, es = state()
    z, idx = torch.randn(6, 4), torch.randint(0, 10, (6,))
    for call in (lambda: vqfast.nearest_code(z, cb, backend=backend), lambda: vqfast.quantize(z, cb, backend=backend),
                 lambda: vqfast.ema_update_(cb, cs, es, z, idx, decay=0.9, backend=backend),
                 lambda: vqfast.kmeans(z, 2, iters=1, backend=backend)):
        with pytest.raises(AssertionError, match="a kernel ran"):
            call()


def state(k=10, d=4, dtype=torch.float32):
    cb = torch.randn(k, d, dtype=dtype)
    cs = torch.rand(k, dtype=dtype) + 0.5
    return cb, cs, cb * cs[:, None]


# ---- bad inputs: TypeError / ValueError naming the argument, before any kernel ----

# (id, transform of z, transform of codebook, exception, message regex)
Z_CB_CASES = [
    ("z_rank0", lambda z: z[0, 0], None, ValueError, r"z must have shape \(\.\.\., D\)"),
    ("codebook_rank1", None, lambda c: c[0], ValueError, r"codebook must be 2-D \(K, D\)"),
    ("codebook_rank3", None, lambda c: c[None], ValueError, r"codebook must be 2-D \(K, D\)"),
    ("D_mismatch", lambda z: z[:, :3], None, ValueError, r"z's last dimension must equal the codebook's D"),
    ("z_int", lambda z: z.long(), None, TypeError, r"z must be float16, bfloat16, float32 or float64"),
    ("z_complex", lambda z: z.to(torch.complex64), None, TypeError, r"z must be float16"),
    ("codebook_int", None, lambda c: c.int(), TypeError, r"codebook must be float16, bfloat16"),
    ("codebook_complex", None, lambda c: c.to(torch.complex128), TypeError, r"codebook must be float16"),
    ("z_meta", lambda z: z.to("meta"), None, ValueError, r"z and codebook must be on the same device"),
    ("codebook_meta", None, lambda c: c.to("meta"), ValueError,
     r"(z and codebook must be on the same device|cluster_size must be on the codebook's device)"),
    ("K0", None, lambda c: c[:0], ValueError, r"codebook must hold at least one code \(K >= 1\)"),
    ("z_list", lambda z: z.tolist(), None, TypeError, r"z must be a torch.Tensor"),
]


def _call(op, backend, z, cb, idx=None, cs=None, es=None):
    if op == "nearest_code":
        return vqfast.nearest_code(z, cb, backend=backend)
    if op == "quantize":
        return vqfast.quantize(z, cb, backend=backend)
    if op == "ema_update_":
        return vqfast.ema_update_(cb, cs, es, z, idx, decay=0.9, backend=backend)
    return vqfast.expire_codes_(cb, cs, es, z, threshold=10.0)


def _op_backends(ops_with_backend, ops_without):
    return ([pytest.param(op, b, id=f"{op}-{b}") for op in ops_with_backend for b in BACKENDS]
            + [pytest.param(op, None, id=op) for op in ops_without])


@pytest.mark.parametrize("op,backend", _op_backends(["nearest_code", "quantize", "ema_update_"], ["expire_codes_"]))
@pytest.mark.parametrize("case", Z_CB_CASES, ids=[c[0] for c in Z_CB_CASES])
def test_bad_z_or_codebook_raises_before_kernel(tripwire, op, backend, case):
    if backend:
        require_backend(backend)
    _, fz, fc, exc, msg = case
    cb, cs, es = state()
    z, idx = torch.randn(6, 4), torch.randint(0, 10, (6,))
    zz = fz(z) if fz else z
    cc = fc(cb.clone()) if fc else cb.clone()
    if op == "ema_update_" and fz is not None and isinstance(zz, torch.Tensor) and zz.dim() == 0:
        idx = idx[0]
    before = [t.clone() for t in (cb, cs, es)]
    with pytest.raises(exc, match=f"^{op}: {msg}"):
        _call(op, backend, zz, cc, idx=idx, cs=cs, es=es)
    for a, b in zip((cs, es), before[1:]):  # buffers untouched
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    ("negative", lambda i: i - 20, ValueError, r"indices must lie in \[0, 10\)"),
    ("too_large", lambda i: i + 10, ValueError, r"indices must lie in \[0, 10\)"),
    ("one_out_of_range", lambda i: torch.cat([i[:-1], i.new_tensor([10])]), ValueError, r"indices must lie in"),
    ("int32", lambda i: i.int(), TypeError, r"indices must be int64"),
    ("float", lambda i: i.float(), TypeError, r"indices must be int64"),
    ("wrong_shape", lambda i: i[:-1], ValueError, r"indices must have shape \(6,\)"),
    ("not_tensor", lambda i: i.tolist(), TypeError, r"indices must be a torch.Tensor"),
    ("cluster_size_meta", None, ValueError, r"cluster_size must be on the codebook's device"),
    ("embed_sum_int", None, TypeError, r"embed_sum must be float16"),
], ids=lambda c: c[0] if isinstance(c, tuple) else str(c))
def test_ema_bad_indices_and_buffers_raise_before_kernel(tripwire, backend, case):
    require_backend(backend)
    name, fi, exc, msg = case
    cb, cs, es = state()
    z, idx = torch.randn(6, 4), torch.randint(0, 10, (6,))
    if fi is not None:
        idx = fi(idx)
    if name == "cluster_size_meta":
        cs = cs.to("meta")
    if name == "embed_sum_int":
        es = es.int()
    cb0 = cb.clone()
    with pytest.raises(exc, match=f"^ema_update_: {msg}"):
        vqfast.ema_update_(cb, cs, es, z, idx, decay=0.9, backend=backend)
    assert torch.equal(cb, cb0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_indices_on_other_device_raise_value_error(tripwire, backend):
    require_backend(backend)
    cb, cs, es = state()
    z, idx = torch.randn(6, 4), torch.randint(0, 10, (6,))
    with pytest.raises(ValueError, match="indices"):
        vqfast.ema_update_(cb, cs, es, z, idx.to("meta"), decay=0.9, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    ("z_rank0", lambda z: z[0, 0], 2, ValueError, r"z must have shape \(\.\.\., D\)"),
    ("z_rank1", lambda z: z[0], 2, ValueError, r"z must have shape \(\.\.\., D\)"),
    ("D0", lambda z: z[:, :0], 2, ValueError, r"z must have shape \(\.\.\., D\) with D >= 1"),
    ("z_int", lambda z: z.long(), 2, TypeError, r"z must be float16"),
    ("z_complex", lambda z: z.to(torch.complex64), 2, TypeError, r"z must be float16"),
    ("K0", None, 0, ValueError, r"num_clusters must be an int in \[1, 6\]"),
    ("K_gt_N", None, 7, ValueError, r"num_clusters must be an int in \[1, 6\]"),
    ("empty", lambda z: z[:0], 1, ValueError, r"num_clusters must be an int in \[1, 0\]"),
], ids=lambda c: c[0] if isinstance(c, tuple) else str(c))
def test_kmeans_bad_input_raises_before_kernel(tripwire, backend, case):
    require_backend(backend)
    _, fz, k, exc, msg = case
    z = torch.randn(6, 4)
    with pytest.raises(exc, match=f"^kmeans: {msg}"):
        vqfast.kmeans(fz(z) if fz else z, k, iters=2, backend=backend)


@pytest.mark.parametrize("case", [
    ("negative", torch.tensor([0, -1, 2]), 3, ValueError, r"indices must lie in \[0, 3\)"),
    ("out_of_range", torch.tensor([0, 3, 2]), 3, ValueError, r"indices must lie in \[0, 3\)"),
    ("K0", torch.tensor([0]), 0, ValueError, r"num_codes must be an int >= 1"),
    ("int32", torch.tensor([0, 1], dtype=torch.int32), 3, TypeError, r"indices must be int64"),
    ("not_tensor", [0, 1], 3, TypeError, r"indices must be a torch.Tensor"),
], ids=lambda c: c[0] if isinstance(c, tuple) else str(c))
def test_codebook_stats_bad_input(case):
    _, idx, k, exc, msg = case
    with pytest.raises(exc, match=f"^codebook_stats: {msg}"):
        vqfast.codebook_stats(idx, k)


@pytest.mark.parametrize("op", ["nearest_code", "quantize", "ema_update_", "kmeans"])
def test_bad_metric_and_backend_names(tripwire, op):
    z, (cb, cs, es) = torch.randn(6, 4), state()
    idx = torch.zeros(6, dtype=torch.long)
    calls = {
        "nearest_code": lambda **kw: vqfast.nearest_code(z, cb, **kw),
        "quantize": lambda **kw: vqfast.quantize(z, cb, **kw),
        "ema_update_": lambda **kw: vqfast.ema_update_(cb, cs, es, z, idx, decay=0.5, **kw),
        "kmeans": lambda **kw: vqfast.kmeans(z, 2, iters=1, **kw),
    }
    if op != "ema_update_":
        with pytest.raises(ValueError, match="metric must be one of"):
            calls[op](metric="euclid")
    if op != "kmeans":  # kmeans hands backend to nearest_code (patched out here)
        with pytest.raises(ValueError, match=f"^{op}: backend must be one of"):
            calls[op](backend="numpy")


# ---- empty input ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_empty_input_every_op(backend, dtype):
    require_backend(backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cb = torch.randn(5, 3, dtype=dtype)
    for shape in [(0, 3), (2, 0, 3), (0, 4, 3)]:
        z = torch.randn(shape, dtype=dtype)
        for metric in METRICS:
            idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
            assert idx.shape == shape[:-1] and idx.dtype == torch.int64
            assert dist.shape == shape[:-1] and dist.dtype == acc
        zz, cc = z.clone().requires_grad_(), cb.clone().requires_grad_()
        r = vqfast.quantize(zz, cc, backend=backend, codebook_grad_through_output=True)
        assert r.z_q.shape == shape and r.indices.shape == shape[:-1]
        assert float(r.commit_loss.detach()) == 0.0 and float(r.codebook_loss.detach()) == 0.0
        (r.z_q.float().sum() + r.commit_loss + r.codebook_loss).backward()
        assert zz.grad.shape == shape and torch.equal(cc.grad, torch.zeros_like(cc))
        bcb, bcs, bes = state(5, 3, acc)
        ref = [t.clone() for t in (bcb, bcs, bes)]
        vqfast.ema_update_(bcb, bcs, bes, z, torch.zeros(shape[:-1], dtype=torch.long), decay=0.9, backend=backend)
        ema_reference.ema_update_(*ref, z.reshape(0, 3).to(acc), torch.zeros(0, dtype=torch.long), 0.9, 1e-5)
        for a, b in zip((bcb, bcs, bes), ref):
            torch.testing.assert_close(a, b)
        before = bcb.clone()
        assert vqfast.expire_codes_(bcb, bcs, bes, z, threshold=100.0) == 0
        assert torch.equal(bcb, before)
    s = vqfast.codebook_stats(torch.zeros(0, 7, dtype=torch.long), 5)
    assert s.counts.tolist() == [0] * 5 and s.usage == 0.0 and s.perplexity == 0.0


# ---- K = 1, D = 1, D = 4096 --------------------------------------------------------

def _check_all_ops(backend, z, cb, metric):
    idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
    assert_nearest(z, cb, metric, idx, dist, brute_rows=None)
    r = vqfast.quantize(z, cb, metric=metric, backend=backend)
    rr = vqfast.quantize(z, cb, metric=metric, backend="torch")
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.z_q, rr.z_q)
    torch.testing.assert_close(r.commit_loss, rr.commit_loss, rtol=1e-4, atol=1e-6)
    zz, cc = z.clone().requires_grad_(), cb.clone().requires_grad_()
    out = vqfast.quantize(zz, cc, metric=metric, backend=backend, estimator="rotation")
    (out.z_q.sum() + out.commit_loss + out.codebook_loss).backward()
    assert torch.isfinite(zz.grad).all() and torch.isfinite(cc.grad).all()
    bcb, bcs, bes = state(cb.shape[0], cb.shape[1])
    ref = [t.clone() for t in (bcb, bcs, bes)]
    vqfast.ema_update_(bcb, bcs, bes, z, idx, decay=0.8, backend=backend)
    ema_reference.ema_update_(*ref, z.float(), idx, 0.8, 1e-5)
    for a, b in zip((bcb, bcs, bes), ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    return idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_single_code(backend, metric):
    require_backend(backend)
    z, cb = torch.randn(50, 8), torch.randn(1, 8)
    idx = _check_all_ops(backend, z, cb, metric)
    assert idx.eq(0).all()
    km = vqfast.kmeans(z, 1, iters=3, backend=backend)
    if metric == "l2":
        torch.testing.assert_close(km.centroids[0], z.mean(0))
    s = vqfast.codebook_stats(idx, 1)
    assert s.counts.tolist() == [50] and s.usage == 1.0 and s.perplexity == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_one_dimension(backend, metric):
    require_backend(backend)
    z, cb = torch.randn(50, 1), torch.randn(20, 1)
    _check_all_ops(backend, z, cb, metric)
    km = vqfast.kmeans(torch.cat([torch.randn(30, 1) - 10, torch.randn(30, 1) + 10]), 2, iters=5,
                       backend=backend)
    assert sorted(km.counts.tolist()) == [30, 30]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_wide_vectors(backend, metric):
    require_backend(backend)
    cb = torch.randn(7, 4096)
    z = cb[torch.tensor([3, 0, 6, 6, 1])] + 0.5 * torch.randn(5, 4096)
    if backend == "triton" and metric != "l2" and os.environ.get("VQFAST_SLOW_TESTS") != "1":
        # The interpreter takes ~20 s per metric for every op at D = 4096: the search only, here.
        idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
        assert_nearest(z, cb, metric, idx, dist, brute_rows=None)
    else:
        idx = _check_all_ops(backend, z, cb, metric)
    assert idx.tolist() == [3, 0, 6, 6, 1]


# ---- non-finite rows ------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _bad_rows(d):
    rows = torch.randn(5, d)
    rows[0] = NAN           # NaN everywhere
    rows[1, d // 2] = NAN   # one NaN
    rows[2, 0] = INF
    rows[3, -1] = -INF
    rows[4, 0], rows[4, -1] = INF, -INF  # inf - inf
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_non_finite_rows_are_contained(backend, metric, dtype):
    """A NaN/Inf row never yields an out-of-range index and never changes another row's result."""
    require_backend(backend)
    k, d = 70, 33
    cb = torch.randn(k, d).to(dtype)
    good = torch.randn(40, d).to(dtype)
    bad = _bad_rows(d).to(dtype)
    where = torch.tensor([0, 7, 8, 20, 39])  # positions of the bad rows among 45
    z = torch.empty(45, d, dtype=dtype)
    mask = torch.zeros(45, dtype=torch.bool)
    mask[where] = True
    z[mask], z[~mask] = bad, good
    i_ref, d_ref = vqfast.nearest_code(good, cb, metric=metric, backend=backend)
    idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
    assert int(idx.min()) >= 0 and int(idx.max()) < k, f"out-of-range index {idx[mask].tolist()}"
    assert torch.equal(idx[~mask], i_ref)
    torch.testing.assert_close(dist[~mask], d_ref, rtol=1e-6, atol=1e-6)
    r = vqfast.quantize(z, cb, metric=metric, backend=backend)
    rg = vqfast.quantize(good, cb, metric=metric, backend=backend)
    assert int(r.indices.min()) >= 0 and int(r.indices.max()) < k
    assert torch.equal(r.indices[~mask], rg.indices)
    torch.testing.assert_close(r.z_q[~mask], rg.z_q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,metric", [pytest.param(b, m, id=f"{b}-{m}") for b in BACKENDS for m in METRICS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_all_nan_row_gets_index_0_and_nan_distance(backend, metric, dtype):
    require_backend(backend)
    cb = torch.randn(9, 6).to(dtype)
    z = torch.randn(3, 6).to(dtype)
    z[1] = NAN
    idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
    assert int(idx[1]) == 0
    assert torch.isnan(dist[1]), f"distance of an all-NaN row is {float(dist[1])}, not NaN"
    assert torch.isfinite(dist[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zdtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_ema_non_finite_rows_keep_codebook_finite(backend, zdtype):
    """Codes whose only rows are non-finite, and an all-bad batch, leave the codebook finite."""
    require_backend(backend)
    bufdtype = torch.float64 if zdtype == torch.float64 else torch.float32
    k, d = 6, 5
    good = torch.randn(20, d).to(zdtype)
    bad = _bad_rows(d).to(zdtype)
    z = torch.cat([good, bad])
    idx = torch.cat([torch.randint(0, 3, (20,)), torch.full((5,), 4)])  # code 4 sees only bad rows
    for zz, ii in [(z, idx), (bad, torch.full((5,), 4)), (bad, torch.arange(5))]:
        cb, cs, es = state(k, d, bufdtype)
        ref = [t.clone() for t in (cb, cs, es)]
        for _ in range(3):
            vqfast.ema_update_(cb, cs, es, zz, ii, decay=0.5, backend=backend)
        keep = torch.isfinite(zz).all(-1)
        for _ in range(3):
            ema_reference.ema_update_(*ref, zz[keep].to(bufdtype), ii[keep], 0.5, 1e-5)
        for a, b in zip((cb, cs, es), ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


# ---- float16 overflow -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_half_inputs_beyond_half_range(backend, metric):
    """Squared norms and dot products far beyond 65504 still pick the right code (float32 accumulation)."""
    require_backend(backend)
    cb = (torch.randn(64, 32) * 200).half()          # ||e||^2 ~ 1.3e6
    pick = torch.randint(0, 64, (80,))
    z = (cb.float()[pick] + torch.randn(80, 32)).half()
    idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
    assert torch.isfinite(dist).all()
    assert_nearest(z, cb, metric, idx, dist, brute_rows=None)
    if metric != "dot":
        assert torch.equal(idx, pick)
    r = vqfast.quantize(z, cb, metric=metric, backend=backend)
    assert torch.equal(r.indices, idx)
    assert torch.isfinite(r.z_q).all() and torch.isfinite(r.commit_loss) and torch.isfinite(r.codebook_loss)
    want = exact_distances(z, cb[idx], "l2").mean() / 32 if metric == "l2" else None
    if want is not None:
        torch.testing.assert_close(r.commit_loss.double(), want, rtol=1e-4, atol=0)
    # the chosen code's distance is within tolerance of the exact float64 one
    assert ((dist.double() - exact_distances(z, cb[idx], metric)).abs() <= tolerance(z, cb, metric)).all()


# ---- 64-bit offsets on the CPU kernel: N x K beyond 2^31 without materializing it ----------------

@pytest.mark.parametrize("n,k,dtype", [
    (2**31 // 1024 + 1000, 1024, torch.float32),   # 2.1M rows x 1024 codes = 2.15e9 scores
    (70000, 32768, torch.float64),                 # 2.29e9 scores; float64 since z^2 ~ 1e9
], ids=["N2.1M-K1024-f32", "N70k-K32768-f64"])
def test_cpu_kernel_offsets_beyond_int32(n, k, dtype):
    """Codes at the integers 0..K-1 and z at j +- 0.25: the nearest code is j, exactly, on every row."""
    require_backend("cpu")
    assert n * k > 2**31
    cb = torch.arange(k, dtype=dtype)[:, None]
    rows = torch.arange(n)
    j = (rows * 7919 + rows // k) % k  # every code, in scrambled order, to the last row
    j[-3:] = torch.tensor([k - 1, 0, k // 2 + 1])
    sign = torch.where(rows % 2 == 0, 0.25, -0.25).to(dtype)
    z = (j.to(dtype) + sign)[:, None]
    idx, dist = vqfast.nearest_code(z, cb, backend="cpu")
    bad = (idx != j).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} wrong indices, first rows {bad[:5].tolist()}: "
                              f"got {idx[bad[:5]].tolist()}, want {j[bad[:5]].tolist()}")
    assert idx[-3:].tolist() == [k - 1, 0, k // 2 + 1]
    assert torch.equal(dist, torch.full_like(dist, 0.0625))
