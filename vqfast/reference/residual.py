r"""Multi-stage (residual) nearest-codebook search, in plain PyTorch.

For rows z of ``z`` (N, D) and Q codebooks ``codebooks`` (Q, K, D), stage q
searches codebook q for the residual the earlier stages left:

    r_0     = z
    i_q     = argmin_k dist(r_q, codebooks[q][k])     (ties to the lowest k)
    d_q     = dist(r_q, codebooks[q][i_q])
    r_{q+1} = r_q - codebooks[q][i_q]

with ``dist`` the metric of :mod:`vqfast.reference.nearest_code` (l2, cosine or
dot, the same NaN rule). The residual is kept in the accumulation dtype
(float32 for half and float32 inputs, float64 for float64) between stages, so
half inputs are never rounded back to half mid-way. ``z ~ sum_q codebooks[q][i_q]``
is the residual-VQ code of z.

Each stage is one :func:`vqfast.reference.nearest_code.nearest_code` call on
the residual, which processes rows in chunks: at most ``max_chunk_elems``
scores exist at once, never the N x K matrix. The residual itself is one
(N, D) buffer. Not differentiable.
"""
from __future__ import annotations

import torch

from vqfast.reference.nearest_code import accumulation_dtype, nearest_code


def residual_nearest_code(z: torch.Tensor, codebooks: torch.Tensor, metric: int, *,
                          max_chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference over 2-D ``z`` (N, D) and ``codebooks`` (Q, K, D).

    Returns int64 indices (N, Q) and distances (N, Q) in the accumulation dtype.
    """
    n, nq = z.shape[0], codebooks.shape[0]
    acc = accumulation_dtype(z.dtype)
    idx = torch.empty((n, nq), dtype=torch.int64, device=z.device)
    dist = torch.empty((n, nq), dtype=acc, device=z.device)
    residual = z.to(acc, copy=True)  # a private copy: updated in place below
    for q in range(nq):
        # Half codes convert to float32 exactly, so the subtraction below is the
        # one any backend does with the code it chose.
        cb = codebooks[q].to(acc)
        i, d = nearest_code(residual, cb, metric, max_chunk_elems=max_chunk_elems)
        idx[:, q] = i
        dist[:, q] = d
        residual -= cb[i]
    return idx, dist
