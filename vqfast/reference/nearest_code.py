r"""Nearest-codebook search, in plain PyTorch.

For each row z of ``z`` (N, D) and codebook e (K, D), find
``argmin_k dist(z, e_k)`` with ties to the lowest k, where

* ``l2``:     dist = ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2
* ``cosine``: dist = 1 - z.e / (max(||z||, eps) max(||e||, eps)),  eps = 1e-12
* ``dot``:    dist = -z.e

The search ranks a per-code *score* that drops the row's own term, so the
ranking is that of ``dist``:

* ``l2``:     score = ||e||^2 - 2 z.e,            dist = max(score + ||z||^2, 0)
* ``cosine``: score = -z.e / max(||e||, eps),     dist = 1 + score / max(||z||, eps)
* ``dot``:    score = -z.e,                       dist = score

Half inputs are computed in float32, float64 in float64. A NaN score never wins
over a number; a row with no finite score gets index 0. Rows are processed in
chunks so that at most ``max_chunk_elems`` scores exist at once: this too never
holds the N x K matrix.
"""
from __future__ import annotations

import torch

METRICS = {"l2": 0, "cosine": 1, "dot": 2}
NORM_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def code_terms(codebook: torch.Tensor, metric: int) -> torch.Tensor:
    """Per-code term of the score: ||e||^2 (l2), 1/max(||e||, eps) (cosine), 0 (dot)."""
    e = codebook.to(accumulation_dtype(codebook.dtype))
    sq = (e * e).sum(-1)
    if metric == METRICS["l2"]:
        return sq
    if metric == METRICS["cosine"]:
        return 1.0 / sq.sqrt().clamp_min(NORM_EPS)
    return torch.zeros_like(sq)


def scores(z: torch.Tensor, codebook: torch.Tensor, metric: int, code: torch.Tensor | None = None) -> torch.Tensor:
    """The (rows, K) score matrix for a chunk of rows."""
    acc = accumulation_dtype(z.dtype)
    dot = z.to(acc) @ codebook.to(acc).T
    code = code_terms(codebook, metric) if code is None else code
    if metric == METRICS["l2"]:
        return code - 2.0 * dot
    if metric == METRICS["cosine"]:
        return -dot * code
    return -dot


def finalize(best_score: torch.Tensor, z: torch.Tensor, metric: int) -> torch.Tensor:
    """Turns the winning score into the distance by adding the row's own term."""
    zz = z.to(best_score.dtype)
    sq = (zz * zz).sum(-1)
    if metric == METRICS["l2"]:
        return (best_score + sq).clamp_min(0.0)
    if metric == METRICS["cosine"]:
        return 1.0 + best_score / sq.sqrt().clamp_min(NORM_EPS)
    return best_score


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, metric: int, *,
                 max_chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference search over 2-D ``z`` (N, D); returns int64 indices and distances."""
    n, k = z.shape[0], codebook.shape[0]
    acc = accumulation_dtype(z.dtype)
    idx = torch.empty(n, dtype=torch.int64, device=z.device)
    dist = torch.empty(n, dtype=acc, device=z.device)
    code = code_terms(codebook, metric)
    rows = max(1, max_chunk_elems // max(k, 1))
    for r0 in range(0, n, rows):
        zc = z[r0:r0 + rows]
        s = scores(zc, codebook, metric, code)
        # argmin takes NaN as the minimum; our rule is that NaN never wins. A
        # row with no number at all keeps code 0 and its NaN score.
        nan = torch.isnan(s)
        best, arg = torch.where(nan, torch.full_like(s, float("inf")), s).min(dim=-1)  # first minimum on ties
        best = torch.where(nan.all(dim=-1), torch.full_like(best, float("nan")), best)
        idx[r0:r0 + rows] = arg
        dist[r0:r0 + rows] = finalize(best, zc, metric)
    return idx, dist
