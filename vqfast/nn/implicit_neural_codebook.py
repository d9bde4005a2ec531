"""Implicit neural codebooks (QINCo, Huijben et al. 2024, arXiv 2401.14732) for ``vqfast.nn.ResidualVQ``,
as vector-quantize-pytorch 1.32.0 implements them (``ResidualVQ(implicit_neural_codebook=True)``).

Stage q >= 1 does not search its stored codebook ``E_q`` (K, d) but per-row codes
``C_q(x) = MLP_q(E_q, condition = quantized_so_far(x))`` (rows, K, d): every row has its own K codes,
so the search is a (rows x K x d) tensor op here, not one of vqfast's fused kernels, and every code
carries gradient to ``E_q`` and the MLP (the codebook is learnable; there is no EMA).

``MLP`` has vector-quantize-pytorch's parameter names (``proj_in``, ``layers.{i}.0`` / ``.2``), so
``ResidualVQ.mlps`` state_dicts load both ways.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# vector-quantize-pytorch's l2norm / safe_div epsilon, used by its rotation trick and cosine codes.
VQP_EPS = 1e-6


class MLP(nn.Module):
    """Code MLP: ``proj_in`` of [condition, code] (2 d -> d), then ``depth`` residual blocks
    Linear(d, hidden) -> SiLU -> Linear(hidden, d); l2-normalized output for cosine codebooks."""

    def __init__(self, dim, dim_hidden=None, depth=4, l2norm_output=False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim))
                                     for _ in range(depth)])
        self.l2norm_output = l2norm_output

    def forward(self, codes: torch.Tensor, *, condition: torch.Tensor) -> torch.Tensor:
        """codes (K, d), condition (b, ..., d) -> per-row codes (b, ..., K, d)."""
        lead = condition.shape[:-1]
        condition = condition.reshape(lead[0], -1, condition.shape[-1])           # b n d
        b, n, k = condition.shape[0], condition.shape[1], codes.shape[0]
        x = torch.cat((condition[:, :, None, :].expand(b, n, k, -1), codes.expand(b, n, k, -1)), dim=-1)
        x = self.proj_in(x)
        for layer in self.layers:
            x = layer(x) + x
        if self.l2norm_output:
            x = F.normalize(x, dim=-1)
        return x.reshape(*lead, k, x.shape[-1])


def rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """vector-quantize-pytorch's rotation trick (arXiv 2410.06424, sec. 4.2): the value of ``tgt`` (to
    rounding), the gradient to ``src`` through the rotation taking src's direction to tgt's, none to tgt."""
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = src / norm_src.clamp(min=VQP_EPS)
    q = tgt / norm_tgt.clamp(min=VQP_EPS)
    w = F.normalize(u + q, dim=-1, eps=VQP_EPS).detach()
    rotated = (src - 2 * (src * w).sum(-1, keepdim=True) * w
               + 2 * (src * u.detach()).sum(-1, keepdim=True) * q.detach())
    return rotated * (norm_tgt / norm_src.clamp(min=VQP_EPS)).detach()


def implicit_stage(vq, mlp: MLP, x: torch.Tensor, condition: torch.Tensor, mask=None, freeze_codebook=False):
    """One QINCo stage: vector-quantize-pytorch's ``VectorQuantize.forward(x, mask=mask,
    codebook_transform_fn=partial(mlp, condition=condition))`` for the configuration ResidualVQ forces
    (heads 1, learnable codebook, no EMA, channel-last, no projection). Returns
    ``(quantized, indices, loss)`` as VectorQuantize does."""
    cb = vq._codebook
    orig_input, input_requires_grad, dtype = x, x.requires_grad, x.dtype
    only_one = x.ndim == 2
    if only_one:
        x, condition = x.unsqueeze(1), condition.unsqueeze(1)
    x = cb.transform_input(x)
    z = x.float()
    freeze = vq.freeze_codebook if freeze_codebook is None else freeze_codebook

    codes = mlp(cb.embed[0].float(), condition=condition)                  # b n K d
    if vq.use_cosine_sim:
        codes = F.normalize(codes, dim=-1, eps=VQP_EPS)
        dist = torch.einsum("bnd,bnkd->bnk", z, codes)
    else:
        dist = -F.pairwise_distance(z[..., None, :], codes)
    indices = dist.argmax(dim=-1)
    quantize = codes.gather(-2, indices[..., None, None].expand(*indices.shape, 1, codes.shape[-1])).squeeze(-2)
    quantize = quantize.to(dtype)

    loss = vq.zero
    if vq.training:
        commit_quantize = quantize.detach() if freeze else quantize
        if input_requires_grad and vq.route_gradients_to_input:
            quantize = rotate_to(x, quantize) if vq.rotation_trick else x + (quantize - x).detach()
        # vector-quantize-pytorch marks its `zero` buffer as requiring grad in training; mirrored.
        loss = vq.zero.requires_grad_()
        if vq.has_commitment_loss:
            if mask is not None:
                commit = F.mse_loss(commit_quantize, orig_input, reduction="none")[mask].mean()
            else:
                commit = F.mse_loss(commit_quantize, x)
            loss = loss + commit * vq.commitment_weight

    if mask is not None:
        masked_out = torch.zeros_like(orig_input) if vq.return_zeros_for_masked_padding else orig_input
        quantize = torch.where(mask[..., None], quantize, masked_out)
        indices = torch.where(mask, indices, -1)
    if only_one:
        quantize, indices = quantize.squeeze(1), indices.squeeze(1)
    return quantize, indices, loss
