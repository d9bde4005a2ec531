r"""Fused quantize, in plain PyTorch: search, gather, losses and their gradients.

Notation: z (N, D) rows, codebook e (K, D), k(i) = nearest_code(z_i). For
``metric="cosine"`` every formula below applies to the normalized vectors
z' = z / max(||z||, eps) and e' = e / max(||e||, eps), and gradients are chained
through the normalization, J(v)^T g = (g - (g.v') v') / max(||v||, eps).
For ``l2`` and ``dot``, z' = z and e' = e.

Forward::

    z_q_i          = e'_{k(i)}
    commit_loss    = mean_{i,d} (z'_i - sg(e'_{k(i)}))^2
    codebook_loss  = mean_{i,d} (sg(z'_i) - e'_{k(i)})^2       (same value, other gradient)

Backward, with upstream gradients g_q (N, D), g_c and g_b (scalars), M = N D::

    dz'_i  = T_i(g_q_i) + (2 g_c / M) (z'_i - e'_{k(i)})
    de'_k  = sum_{i: k(i)=k} [ -(2 g_b / M) (z'_i - e'_k) + [through_output] g_q_i ]

where the estimator T is

* ``"ste"`` (straight-through): T_i(g) = g;
* ``"rotation"`` (Fifty et al. 2024, "Restructuring vector quantization with the
  rotation trick"): z_q_i = lambda_i R_i z'_i with u = z'_i/||z'_i||,
  q = e'_{k(i)}/||e'_{k(i)}||, w = (u + q)/||u + q||,
  R_i = I - 2 w w^T + 2 q u^T (the rotation taking u to q), and
  lambda_i = ||e'_{k(i)}|| / ||z'_i||, both held constant. So the forward value is
  still e'_{k(i)}, and T_i(g) = lambda_i R_i^T g = lambda_i (g - 2 (w.g) w + 2 (q.g) u).

``through_output`` (a learnable codebook, as when z_q = e + (z - sg(z))) also
sends g_q to the chosen codes; otherwise codes learn only from codebook_loss.

The codebook gradient is a segment sum over rows grouped by code, done here in
a fixed order (``index_add_`` on sorted indices) so it is deterministic.
"""
from __future__ import annotations

import torch

from vqfast.reference import nearest_code as search
from vqfast.reference.nearest_code import METRICS, NORM_EPS, accumulation_dtype

ESTIMATORS = {"ste": 0, "rotation": 1}


def normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def normalize_backward(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """J(v)^T g for v -> v / max(||v||, eps)."""
    n = v.norm(dim=-1, keepdim=True)
    vh = v / n.clamp_min(NORM_EPS)
    # Below eps the map is v / eps: linear, Jacobian I / eps.
    radial = torch.where(n > NORM_EPS, (g * vh).sum(-1, keepdim=True) * vh, torch.zeros_like(g))
    return (g - radial) / n.clamp_min(NORM_EPS)


def rotation_transpose_apply(zp: torch.Tensor, ep: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """lambda R^T g for the rotation trick, rows independent (see module docstring)."""
    zn = zp.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    en = ep.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    u, q = zp / zn, ep / en
    w = normalize(u + q)
    out = g - 2.0 * (w * g).sum(-1, keepdim=True) * w + 2.0 * (q * g).sum(-1, keepdim=True) * u
    return out * (en / zn)


def quantize_forward(z: torch.Tensor, codebook: torch.Tensor, metric: int):
    """(z_q, indices, sq_err_sum) for 2-D z; sq_err_sum is float32 (float64 for float64)."""
    idx, _ = search.nearest_code(z, codebook, metric)
    acc = accumulation_dtype(z.dtype)
    zp, ep = z.to(acc), codebook.to(acc)
    if metric == METRICS["cosine"]:
        zp, ep = normalize(zp), normalize(ep)
    eq = ep[idx]
    sq_err = ((zp - eq) ** 2).sum()
    return eq.to(z.dtype), idx, sq_err


def quantize_backward(grad_zq, grad_commit, grad_codebook_loss, z, codebook, idx, metric: int,
                      estimator: int, through_output: bool):
    """(grad_z, grad_codebook) from the formulas in the module docstring."""
    acc = accumulation_dtype(z.dtype)
    n, d = z.shape
    m = max(n * d, 1)
    zp, ep = z.to(acc), codebook.to(acc)
    cosine = metric == METRICS["cosine"]
    if cosine:
        zp, ep = normalize(zp), normalize(ep)
    eq = ep[idx]
    gq = grad_zq.to(acc)
    diff = zp - eq
    t = rotation_transpose_apply(zp, eq, gq) if estimator == ESTIMATORS["rotation"] else gq
    gz = t + (2.0 * grad_commit.to(acc) / m) * diff
    rows = -(2.0 * grad_codebook_loss.to(acc) / m) * diff
    if through_output:
        rows = rows + gq
    order = torch.argsort(idx, stable=True)  # fixed summation order: deterministic
    gep = torch.zeros(codebook.shape, dtype=acc, device=z.device).index_add_(0, idx[order], rows[order])
    if cosine:
        gz = normalize_backward(z.to(acc), gz)
        gep = normalize_backward(codebook.to(acc), gep)
    return gz.to(z.dtype), gep.to(codebook.dtype)


def quantize_autograd(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", estimator: str = "ste",
                      through_output: bool = False):
    """The same quantizer written with detach tricks, differentiated by autograd:
    the independent statement of the gradients that the kernels' backward is tested against."""
    mid = METRICS[metric]
    with torch.no_grad():
        idx, _ = search.nearest_code(z.detach(), codebook.detach(), mid)
    zp, ep = (normalize(z), normalize(codebook)) if metric == "cosine" else (z, codebook)
    eq = ep[idx]
    if estimator == "rotation":
        zn = zp.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        en = eq.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        u, q = (zp / zn).detach(), (eq / en).detach()
        w = normalize(u + q).detach()
        rotated = zp - 2.0 * (zp * w).sum(-1, keepdim=True) * w + 2.0 * (zp * u).sum(-1, keepdim=True) * q
        zq_z = rotated * (en / zn).detach()
    else:
        zq_z = zp
    out = zq_z + (eq - zq_z).detach()  # forward value e'; gradient to z through the estimator
    if through_output:
        out = out + (eq - eq.detach())
    commit = ((zp - eq.detach()) ** 2).mean()
    cb_loss = ((zp.detach() - eq) ** 2).mean()
    return out, idx, commit, cb_loss
