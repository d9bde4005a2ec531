r"""EMA codebook update (van den Oord et al. 2017, appendix A.1), in plain PyTorch.

With z (N, D) rows assigned to codes idx (N,), decay gamma and smoothing eps::

    n_k      = #{i : idx_i = k}                         (batch counts)
    s_k      = sum_{i : idx_i = k} z_i                  (batch sums)
    N_k     <- gamma N_k + (1 - gamma) n_k              (cluster_size, in place)
    m_k     <- gamma m_k + (1 - gamma) s_k              (embed_avg, in place)
    n        = sum_k N_k
    N~_k     = (N_k + eps) / (n + K eps) * n            (Laplace smoothing)
    e_k     <- m_k / N~_k                               (codebook, in place)

which is what taming-transformers' EMAVectorQuantizer and vector-quantize-pytorch
(``lerp_`` then ``laplace_smoothing``) compute. Rows with a non-finite value are
skipped, so one bad batch cannot poison the codebook. Sums are taken in float32
(float64 for float64 buffers) in a fixed order (sorted by code).
"""
from __future__ import annotations

import torch


def code_sums(values: torch.Tensor, idx: torch.Tensor, num_codes: int, acc: torch.dtype):
    """(counts (K,), sums (K, D)) of rows grouped by code, summed in a fixed order."""
    order = torch.argsort(idx, stable=True)
    sidx = idx[order]
    counts = torch.bincount(sidx, minlength=num_codes).to(acc)
    sums = torch.zeros(num_codes, values.shape[1], dtype=acc, device=values.device)
    sums.index_add_(0, sidx, values[order].to(acc))
    return counts, sums


def finite_rows(z: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(z).all(dim=-1)


def ema_update_(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor, z: torch.Tensor,
                idx: torch.Tensor, decay: float, eps: float) -> None:
    keep = finite_rows(z)
    if not bool(keep.all()):
        z, idx = z[keep], idx[keep]
    acc = torch.float64 if cluster_size.dtype == torch.float64 else torch.float32
    counts, sums = code_sums(z, idx, codebook.shape[0], acc)
    cs = cluster_size.to(acc).lerp_(counts, 1.0 - decay)
    ea = embed_avg.to(acc).lerp_(sums, 1.0 - decay)
    n = cs.sum()
    smoothed = (cs + eps) / (n + codebook.shape[0] * eps) * n
    cluster_size.copy_(cs)
    embed_avg.copy_(ea)
    codebook.copy_(ea / smoothed.unsqueeze(-1))
