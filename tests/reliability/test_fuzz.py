"""Property tests: every CPU backend against the reference over random shapes,
dtypes, strides, metrics and value ranges.

Each property is parametrized by backend, so every backend gets its own
Hypothesis run (and its own line in ``--hypothesis-show-statistics``). The
Triton backend runs under the interpreter (slow), so its shapes are capped.
Profiles (examples per property) live in tests/reliability/conftest.py.
"""
import collections

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import vqfast
from tests.checks import assert_nearest, exact_distances, tolerance
from tests.conftest import require_backend
from vqfast.reference import ema as ema_reference

BACKENDS = ["torch", "cpu", "triton"]
METRICS = ("l2", "cosine", "dot")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ESTIMATORS = ("ste", "rotation")
LAYOUTS = ("contiguous", "transpose", "col_step", "row_step")
# Forward/backward agreement between two backends on the same rounded inputs.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

# Shape bounds: (N, K, D) maxima per backend.
MAX_SHAPE = {"torch": (200, 64, 70), "cpu": (200, 64, 70), "triton": (64, 24, 48)}

_default = settings.default.max_examples
EXAMPLES = {"torch": _default, "cpu": _default, "triton": max(5, _default * 4 // 5)}

# Examples each property ran to completion (passing, not rejected by assume), printed at the end of
# the session by tests/reliability/conftest.py and written to $VQFAST_FUZZ_REPORT when set.
EXAMPLES_RUN = collections.Counter()


def _fuzz(backend, check, **strategies):
    """A Hypothesis test of check(backend, p, **drawn) for one backend (its own statistics line)."""
    @settings(settings.default, max_examples=EXAMPLES[backend])
    @given(p=problems(backend), **strategies)
    def test(p, **drawn):
        require_backend(backend)
        check(backend, p, **drawn)
        EXAMPLES_RUN[name] += 1

    name = f"test_{check.__name__.removeprefix('check_')}_fuzz_{backend}"
    test.__name__ = name
    test.__qualname__ = test.__name__
    return test


@st.composite
def problems(draw, backend, dtypes=DTYPES, n_min=0):
    nmax, kmax, dmax = MAX_SHAPE[backend]
    return dict(
        n=draw(st.integers(n_min, nmax)),
        k=draw(st.integers(1, kmax)),
        d=draw(st.integers(1, dmax)),
        dtype=draw(st.sampled_from(dtypes)),
        metric=draw(st.sampled_from(METRICS)),
        layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from([1e-3, 1e-1, 1.0, 10.0, 1e3])),
        offset=draw(st.sampled_from([0.0, 0.5, -2.0, 3.0])),  # in units of scale
        dup=draw(st.booleans()),  # some z rows are exact codes (zero distances, ties)
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(p):
    """(z (N, D) possibly non-contiguous, codebook (K, D)), both of p's dtype."""
    g = torch.Generator().manual_seed(p["seed"])
    n, k, d, dtype = p["n"], p["k"], p["d"], p["dtype"]
    s, off = p["scale"], p["offset"] * p["scale"]
    cb = (torch.randn(k, d, generator=g, dtype=torch.float64) * s + off).to(dtype)
    zv = torch.randn(n, d, generator=g, dtype=torch.float64) * s + off
    if p["dup"] and n:
        rows = torch.randint(0, n, (max(1, n // 4),), generator=g)
        zv[rows] = cb[torch.randint(0, k, (rows.numel(),), generator=g)].double()
    zv = zv.to(dtype)
    layout = p["layout"]
    if layout == "transpose":
        z = zv.T.contiguous().T
    elif layout == "col_step":
        z = torch.zeros(n, 2 * d, dtype=dtype)[:, ::2]
        z.copy_(zv)
    elif layout == "row_step":
        z = torch.zeros(2 * n, d, dtype=dtype)[::2]
        z.copy_(zv)
    else:
        z = zv
    if layout != "contiguous" and n > 1 and d > 1:
        assert not z.is_contiguous()
    assert torch.equal(z, zv)
    return z, cb


# ---- nearest_code -----------------------------------------------------------

def check_nearest_code(backend, p):
    z, cb = make_inputs(p)
    idx, dist = vqfast.nearest_code(z, cb, metric=p["metric"], backend=backend)
    assert idx.shape == (p["n"],)
    assert_nearest(z, cb, p["metric"], idx, dist, brute_rows=None)


# ---- quantize forward and backward -----------------------------------------

def _loss(r, gq, wc=0.7, wb=1.3):
    return (r.z_q.to(gq.dtype) * gq).sum() + wc * r.commit_loss + wb * r.codebook_loss


def _close(a, b, tol, what):
    b = b.detach().double()
    atol = tol * max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
    torch.testing.assert_close(a.detach().double(), b, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_quantize(backend, p, estimator, through):
    """Forward and backward of a backend against backend="torch" on identical inputs."""
    z0, cb0 = make_inputs(p)
    metric, dtype = p["metric"], p["dtype"]
    kw = dict(metric=metric, estimator=estimator, codebook_grad_through_output=through)
    runs = {}
    for b in (backend, "torch"):
        z, cb = z0.clone().requires_grad_(), cb0.clone().requires_grad_()
        runs[b] = (vqfast.quantize(z, cb, backend=b, **kw), z, cb)
    r, z, cb = runs[backend]
    rr, zr, cbr = runs["torch"]
    assert r.indices.shape == (p["n"],) and r.z_q.shape == z0.shape and r.z_q.dtype == dtype
    if p["n"]:
        assert int(r.indices.min()) >= 0 and int(r.indices.max()) < p["k"]
    if not torch.equal(r.indices, rr.indices):
        # A near-tie flipped: the chosen codes must be as near, in exact float64 distances.
        a = exact_distances(z0, cb0[r.indices], metric)
        b = exact_distances(z0, cb0[rr.indices], metric)
        tol = tolerance(z0, cb0, metric)
        assert ((a - b).abs() <= tol).all(), f"chose a code {float((a - b).abs().max()):.3g} farther"
        return
    tol = RTOL[dtype]
    _close(r.z_q, rr.z_q, tol, "z_q")
    _close(r.commit_loss, rr.commit_loss, tol, "commit_loss")
    _close(r.codebook_loss, rr.codebook_loss, tol, "codebook_loss")
    assert torch.isfinite(r.commit_loss) and torch.isfinite(r.codebook_loss)
    g = torch.Generator().manual_seed(p["seed"] + 1)
    gdtype = torch.float64 if dtype == torch.float64 else torch.float32
    gq = torch.randn(z0.shape, generator=g, dtype=gdtype)
    gk = torch.autograd.grad(_loss(r, gq), (z, cb))
    gr = torch.autograd.grad(_loss(rr, gq), (zr, cbr))
    for name, a, b in zip(("grad_z", "grad_codebook"), gk, gr):
        assert a.shape == b.shape and a.dtype == b.dtype
        _close(a, b, tol, name)


# ---- ema_update_ --------------------------------------------------------------

def check_ema_update(backend, p, bufdtype, decay, eps, bad):
    """In-place EMA update against vqfast.reference.ema on the same inputs, non-finite rows included."""
    z, _ = make_inputs(p)
    n, k, d = p["n"], p["k"], p["d"]
    g = torch.Generator().manual_seed(p["seed"] + 2)
    cs = (torch.rand(k, generator=g, dtype=torch.float64) * 3 + 0.1).to(bufdtype)
    cb = (torch.randn(k, d, generator=g, dtype=torch.float64) * p["scale"]).to(bufdtype)
    ea = cb * cs[:, None]
    idx = torch.randint(0, k, (n,), generator=g)
    if bad != "none" and n:
        z = z.clone()
        rows = torch.randint(0, n, (max(1, n // 5),), generator=g)
        cols = torch.randint(0, d, rows.shape, generator=g)
        vals = {"nan": [float("nan")], "inf": [float("inf"), -float("inf")],
                "mixed": [float("nan"), float("inf"), -float("inf")]}[bad]
        for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            z[r, c] = vals[i % len(vals)]
    if decay == 0.0:
        # decay 0 resets the counts to the batch's: with eps = 0 an unused code's smoothed
        # count is 0 (0/0 by definition), and so is every code's when no row is usable.
        eps = eps or 1e-5
        assume(bool(torch.isfinite(z).all(-1).any()))
    mine = [t.clone() for t in (cb, cs, ea)]
    ref = [t.clone() for t in (cb, cs, ea)]
    vqfast.ema_update_(*mine, z, idx, decay=decay, eps=eps, backend=backend)
    ema_reference.ema_update_(*ref, z.to(bufdtype), idx, decay, eps)
    tol = 1e-10 if bufdtype == torch.float64 else 5e-5
    for name, a, b in zip(("codebook", "cluster_size", "embed_sum"), mine, ref):
        assert a.dtype == bufdtype
        assert torch.isfinite(a).all(), f"{name} not finite"
        _close(a, b, tol, name)


EMA_STRATEGIES = dict(bufdtype=st.sampled_from([torch.float32, torch.float64]),
                      decay=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), eps=st.sampled_from([0.0, 1e-5, 1e-2]),
                      bad=st.sampled_from(["none", "nan", "inf", "mixed"]))
QUANTIZE_STRATEGIES = dict(estimator=st.sampled_from(ESTIMATORS), through=st.booleans())

test_nearest_code_fuzz_torch = _fuzz("torch", check_nearest_code)
test_nearest_code_fuzz_cpu = _fuzz("cpu", check_nearest_code)
test_nearest_code_fuzz_triton = _fuzz("triton", check_nearest_code)
test_quantize_fuzz_cpu = _fuzz("cpu", check_quantize, **QUANTIZE_STRATEGIES)
test_quantize_fuzz_triton = _fuzz("triton", check_quantize, **QUANTIZE_STRATEGIES)
test_ema_update_fuzz_torch = _fuzz("torch", check_ema_update, **EMA_STRATEGIES)
test_ema_update_fuzz_cpu = _fuzz("cpu", check_ema_update, **EMA_STRATEGIES)
test_ema_update_fuzz_triton = _fuzz("triton", check_ema_update, **EMA_STRATEGIES)
