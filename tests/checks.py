"""Correctness checks shared by the op tests: exact float64 distances and
per-dtype tolerances, in one place."""
from __future__ import annotations

import torch

NORM_EPS = 1e-12

# Relative tolerance on a chosen code's distance, scaled by the magnitude of
# the terms the kernel sums (||z||^2 + ||e||^2 for l2, ||z|| ||e|| for dot).
# Half inputs are computed in float32, so their inputs are exact and only the
# float32 accumulation counts.
REL_TOL = {torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float32: 2e-5, torch.float64: 1e-11}


def exact_distances(z: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance of each row of z to the matching row of codes, in float64, from
    the definition (not the expanded form the kernels use)."""
    z, e = z.double(), codes.double()
    if metric == "l2":
        return ((z - e) ** 2).sum(-1)
    if metric == "dot":
        return -(z * e).sum(-1)
    zn = z.norm(dim=-1).clamp_min(NORM_EPS)
    en = e.norm(dim=-1).clamp_min(NORM_EPS)
    return 1.0 - (z * e).sum(-1) / (zn * en)


def all_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 brute force, for test-sized inputs only."""
    z, e = z.double(), codebook.double()
    if metric == "l2":
        return torch.cdist(z, e) ** 2 if z.shape[0] * e.shape[0] > 0 else z.new_empty(z.shape[0], e.shape[0])
    if metric == "dot":
        return -(z @ e.T)
    zn = z.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    en = e.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return 1.0 - (z / zn) @ (e / en).T


def tolerance(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-row absolute tolerance for the chosen distance."""
    rel = REL_TOL[z.dtype]
    z, e = z.double(), codebook.double()
    zsq = (z * z).sum(-1)
    emax = (e * e).sum(-1).max()
    if metric == "l2":
        scale = zsq + emax
    elif metric == "dot":
        scale = zsq.sqrt() * emax.sqrt()
    else:
        scale = torch.ones_like(zsq)
    return rel * scale * max(1.0, z.shape[-1] ** 0.5 / 8) + 1e-30


def assert_nearest(z2: torch.Tensor, codebook: torch.Tensor, metric: str, idx: torch.Tensor,
                   dist: torch.Tensor, *, brute_rows: int | None = 4096) -> None:
    """The contract of nearest_code on 2-D z:

    * every index in range, every distance written (outputs are poisoned/NaN-free inputs);
    * the reported distance is the chosen code's exact distance, within tolerance;
    * the chosen code is within tolerance of the true float64 minimum; where the
      float64 margin to the runner-up exceeds the tolerance, the index is exact.
    Brute force runs on at most ``brute_rows`` rows (a random subset beyond that).
    """
    n, k = z2.shape[0], codebook.shape[0]
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    want_dist_dtype = torch.float64 if z2.dtype == torch.float64 else torch.float32
    assert dist.dtype == want_dist_dtype and dist.shape == (n,)
    if n == 0:
        return
    assert int(idx.min()) >= 0 and int(idx.max()) < k, "index out of range"
    assert torch.isfinite(dist).all(), "a distance was not written (or is not finite)"
    tol = tolerance(z2, codebook, metric)
    chosen = exact_distances(z2, codebook[idx], metric)
    err = (dist.double() - chosen).abs()
    assert (err <= tol).all(), f"reported distance off by {float((err - tol).max()):.3g} beyond tolerance"
    rows = torch.arange(n) if brute_rows is None or n <= brute_rows else torch.randperm(n)[:brute_rows]
    d = all_distances(z2[rows], codebook, metric)
    best, best_idx = d.min(dim=-1)
    excess = chosen[rows] - best
    assert (excess <= tol[rows]).all(), (
        f"chose a code {float(excess.max()):.3g} worse than the true nearest (tol {float(tol[rows].max()):.3g})")
    if k > 1:
        second = d.scatter(1, best_idx[:, None], float("inf")).min(dim=-1).values
        clear = (second - best) > 2 * tol[rows]
        assert torch.equal(idx[rows][clear], best_idx[clear]), "wrong index where the margin is clear"
