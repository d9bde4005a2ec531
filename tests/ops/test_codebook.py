"""ema_update_, expire_codes_, kmeans, codebook_stats."""
import math

import pytest
import torch

import vqfast
from tests.conftest import require_backend
from vqfast.reference import ema as reference

EMA_BACKENDS = ["cpu", "torch", "triton"]


def ema_state(k, d, dtype=torch.float32):
    cb = torch.randn(k, d, dtype=dtype)
    cs = torch.rand(k, dtype=dtype) * 3
    ea = cb * cs.unsqueeze(-1)
    return cb, cs, ea


def skip_if_missing(backend, op):
    require_backend(backend)
    why = vqfast.registry.op_reason(backend, op)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("backend", EMA_BACKENDS)
@pytest.mark.parametrize("zdtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_ema_matches_reference(backend, zdtype):
    skip_if_missing(backend, "ema_update_")
    for (n, k, d) in [(0, 4, 3), (1, 1, 1), (500, 64, 8), (3000, 300, 64)]:
        bufdtype = torch.float64 if zdtype == torch.float64 else torch.float32
        state = ema_state(k, d, bufdtype)
        z = torch.randn(n, d).to(zdtype)
        idx = torch.randint(0, k, (n,))
        mine = [t.clone() for t in state]
        ref = [t.clone() for t in state]
        vqfast.ema_update_(*mine, z, idx, decay=0.8, eps=1e-5, backend=backend)
        reference.ema_update_(*ref, z.to(bufdtype), idx, 0.8, 1e-5)
        tol = 1e-12 if bufdtype == torch.float64 else 2e-5
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", EMA_BACKENDS)
def test_ema_converges_to_mixture_means(backend):
    """Many EMA steps on a fixed mixture of Gaussians: the codes settle on the means."""
    skip_if_missing(backend, "ema_update_")
    k, d = 8, 4
    means = torch.randn(k, d) * 6
    cb = means + torch.randn(k, d) * 1.5  # started near, not at, the means
    cs = torch.zeros(k)
    ea = cb.clone()
    for _ in range(200):
        comp = torch.randint(0, k, (512,))
        z = means[comp] + 0.3 * torch.randn(512, d)
        idx, _ = vqfast.nearest_code(z, cb)
        vqfast.ema_update_(cb, cs, ea, z, idx, decay=0.9, backend=backend)
    err = (cb - means).norm(dim=-1)
    assert err.max() < 0.1, f"codes did not converge to the means: errors {err.tolist()}"


def test_ema_identical_across_backends():
    torch.manual_seed(3)
    state = ema_state(100, 16)
    z, idx = torch.randn(4000, 16), torch.randint(0, 100, (4000,))
    results = {}
    for backend in ("cpu", "torch", "triton"):
        if vqfast.registry.op_reason(backend, "ema_update_") or not vqfast.backends()[backend].available:
            continue
        s = [t.clone() for t in state]
        vqfast.ema_update_(*s, z, idx, decay=0.99, backend=backend)
        results[backend] = s
    assert "cpu" in results and "torch" in results
    for name, s in results.items():
        for a, b in zip(s, results["torch"]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", EMA_BACKENDS)
def test_ema_skips_non_finite_rows(backend):
    skip_if_missing(backend, "ema_update_")
    cb, cs, ea = ema_state(10, 4)
    z = torch.randn(50, 4)
    z[3, 1] = float("nan")
    z[7] = float("inf")
    idx = torch.randint(0, 10, (50,))
    mine = [t.clone() for t in (cb, cs, ea)]
    vqfast.ema_update_(*mine, z, idx, decay=0.9, backend=backend)
    assert all(torch.isfinite(t).all() for t in mine)
    keep = torch.isfinite(z).all(-1)
    ref = [t.clone() for t in (cb, cs, ea)]
    reference.ema_update_(*ref, z[keep], idx[keep], 0.9, 1e-5)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_ema_bad_input():
    cb, cs, ea = ema_state(10, 4)
    z, idx = torch.randn(5, 4), torch.randint(0, 10, (5,))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        vqfast.ema_update_(cb, cs, ea, z, idx + 10, decay=0.9)
    with pytest.raises(ValueError, match=r"indices must lie in"):
        vqfast.ema_update_(cb, cs, ea, z, idx - 11, decay=0.9)
    with pytest.raises(TypeError, match="indices must be int64"):
        vqfast.ema_update_(cb, cs, ea, z, idx.int(), decay=0.9)
    with pytest.raises(ValueError, match="cluster_size must have shape"):
        vqfast.ema_update_(cb, cs[:5], ea, z, idx, decay=0.9)
    with pytest.raises(ValueError, match="decay must be a float in"):
        vqfast.ema_update_(cb, cs, ea, z, idx, decay=1.5)
    with pytest.raises(TypeError, match="codebook must be float32 or float64"):
        vqfast.ema_update_(cb.half(), cs.half(), ea.half(), z, idx, decay=0.9)
    with pytest.raises(ValueError, match="indices must have shape"):
        vqfast.ema_update_(cb, cs, ea, z, idx[:3], decay=0.9)


@pytest.mark.parametrize("backend", EMA_BACKENDS)
def test_ema_deterministic(backend):
    skip_if_missing(backend, "ema_update_")
    n = 2000 if backend == "triton" else 20000  # the interpreter is slow
    torch.use_deterministic_algorithms(True)
    try:
        state = ema_state(8, 32)
        z, idx = torch.randn(n, 32), torch.randint(0, 8, (n,))
        runs = []
        for _ in range(2):
            s = [t.clone() for t in state]
            vqfast.ema_update_(*s, z, idx, decay=0.5, backend=backend)
            runs.append(s)
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.use_deterministic_algorithms(False)


def test_expire_codes_replaces_dead_codes_from_batch():
    cb, cs, ea = ema_state(12, 4)
    cs[:] = 5.0
    dead = torch.tensor([1, 4, 9])
    cs[dead] = 0.1
    z = torch.randn(40, 4)
    z[0] = float("nan")
    g = torch.Generator().manual_seed(7)
    n = vqfast.expire_codes_(cb, cs, ea, z, threshold=1.0, generator=g)
    assert n == 3
    for k in dead.tolist():
        match = (z == cb[k]).all(-1)
        assert match.any(), "a dead code was not replaced by a batch vector"
        assert cs[k] == 1.0
        torch.testing.assert_close(ea[k], cb[k] * 1.0)
    assert len({tuple(cb[k].tolist()) for k in dead.tolist()}) == 3, "sampled with replacement"
    # seeded: reproducible
    cb2, cs2, ea2 = ema_state(12, 4)
    cs2[:] = 5.0
    cs2[dead] = 0.1
    vqfast.expire_codes_(cb2, cs2, ea2, z, threshold=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(cb2[dead], cb[dead])


def test_expire_more_dead_than_samples():
    cb, cs, ea = ema_state(20, 3)
    cs.zero_()
    z = torch.randn(5, 3)
    assert vqfast.expire_codes_(cb, cs, ea, z, threshold=1.0) == 5
    assert int((cs == 1.0).sum()) == 5


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_finds_separated_clusters(init):
    k, d = 6, 5
    means = torch.randn(k, d) * 20
    z = means[torch.randint(0, k, (3000,))] + torch.randn(3000, d) * 0.1
    g = torch.Generator().manual_seed(1)
    centroids, counts = vqfast.kmeans(z, k, iters=20, init=init, generator=g)
    dist = torch.cdist(means, centroids)
    if init == "kmeans++":  # k-means++ seeding on separated clusters finds every one
        assert (dist.min(dim=1).values < 0.1).all()
    assert int(counts.sum()) == 3000
    assert centroids.shape == (k, d)


def test_kmeans_cosine_returns_unit_vectors():
    c, _ = vqfast.kmeans(torch.randn(500, 8), 10, iters=5, metric="cosine")
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(10))


def test_kmeans_bad_input():
    with pytest.raises(ValueError, match="num_clusters must be an int in"):
        vqfast.kmeans(torch.randn(10, 3), 11)
    with pytest.raises(ValueError, match="metric must be one of"):
        vqfast.kmeans(torch.randn(10, 3), 2, metric="dot")


def test_codebook_stats():
    idx = torch.tensor([0, 0, 1, 3])
    s = vqfast.codebook_stats(idx, 4)
    assert s.counts.tolist() == [2, 1, 0, 1]
    assert s.usage == 0.75
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert math.isclose(s.perplexity, math.exp(float(-(p * p.log()).sum())))
    uniform = vqfast.codebook_stats(torch.arange(16).repeat(3), 16)
    assert math.isclose(uniform.perplexity, 16.0, rel_tol=1e-9)
    with pytest.raises(ValueError, match="indices must lie in"):
        vqfast.codebook_stats(torch.tensor([5]), 4)
