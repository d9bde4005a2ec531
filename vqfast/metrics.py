"""Reconstruction and codebook metrics: PSNR, SSIM, codebook usage, perplexity, bits per pixel.

Images are float tensors in [0, 1], ``(B, C, H, W)``. PSNR is averaged over images (each image's
own MSE), as image-compression papers report it; SSIM is scikit-image's
``structural_similarity`` (Wang et al. 2004, 7x7 uniform window, data range 1) per image, averaged.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from vqfast.ops.codebook import codebook_stats


def downsample_factor(model) -> int:
    """Pixels per code along each side: ``VQVAE.downsample`` or ``VQGAN.downsample_factor``."""
    return int(getattr(model, "downsample", None) or model.downsample_factor)


def codebook_size_of(model) -> int:
    return int(getattr(model, "codebook_size", None) or model.n_embed)


def forward_with_indices(model, x: torch.Tensor):
    """``(xrec, qloss, indices)`` with indices ``(B, h, w)`` (``(B, h, w, Q)`` for a residual
    quantizer) from either model: VQVAE's info is ``{"indices": ...}``, VQGAN's is taming's
    ``(perplexity, one_hot, flat_indices)``."""
    xrec, qloss, info = model(x)
    inner = model
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):   # DDP, torch.compile wrappers
        inner = getattr(inner, "module", None) or inner._orig_mod
    f = downsample_factor(inner)
    indices = info["indices"] if isinstance(info, dict) else info[2]
    b, h, w = x.shape[0], x.shape[-2] // f, x.shape[-1] // f
    indices = indices.reshape(b, h, w, -1)
    return xrec, qloss, indices[..., 0] if indices.shape[-1] == 1 else indices


def _check_pair(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    for arg, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be a float tensor (B, C, H, W) in [0, 1]")
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{name}: x and y must have the same shape (B, C, H, W), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), in dB; an exact copy counts as 100 dB."""
    _check_pair("psnr", x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of scikit-image's SSIM (colour channels averaged)."""
    from skimage.metrics import structural_similarity
    _check_pair("ssim", x, y)
    a = x.detach().double().cpu().permute(0, 2, 3, 1).numpy()
    b = y.detach().double().cpu().permute(0, 2, 3, 1).numpy()
    # skimage's default 7x7 window needs images at least 7 pixels wide.
    win = min(7, *a.shape[1:3]) | 1
    return float(np.mean([structural_similarity(p, q, data_range=1.0, channel_axis=-1, win_size=win)
                          for p, q in zip(a, b)]))


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict:
    """Usage (fraction of the K codes chosen at least once), perplexity (exp of the entropy of the
    code histogram) and the counts; a residual quantizer's stages (trailing axis) are pooled."""
    st = codebook_stats(indices.reshape(-1).long(), codebook_size)
    return {"usage": st.usage, "perplexity": st.perplexity, "counts": st.counts}


def bits_per_pixel(num_codes: int, codebook_size: int, num_pixels: int) -> float:
    """Bits per pixel of the fixed-length code stream: ceil(log2 K) bits per index (what
    :mod:`vqfast.codec` writes, header excluded)."""
    return num_codes * max(1, math.ceil(math.log2(codebook_size))) / num_pixels


def entropy_bits_per_pixel(perplexity: float, num_codes: int, num_pixels: int) -> float:
    """Bits per pixel an ideal entropy coder of the empirical code distribution would reach:
    log2(perplexity) bits per index (a lower bound for a memoryless coder)."""
    return num_codes * math.log2(max(perplexity, 1.0)) / num_pixels


def reconstruction_metrics(model, images: torch.Tensor, batch_size: int = 64) -> dict:
    """PSNR, SSIM, usage, perplexity and bits per pixel of ``model`` (a VQ-VAE/VQ-GAN whose
    ``forward(x) -> (xrec, qloss, info)`` works on [-1, 1]) on ``images`` in [0, 1]; returns
    ``(metrics, reconstructions in [0, 1])``."""
    was_training = model.training
    model.eval()
    recs, codes = [], []
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            for i in range(0, images.shape[0], batch_size):
                x = images[i:i + batch_size].to(device)
                xrec, _, indices = forward_with_indices(model, x * 2 - 1)
                recs.append(((xrec.float() + 1) / 2).clamp(0, 1).cpu())
                codes.append(indices.cpu())
    finally:
        model.train(was_training)
    rec = torch.cat(recs)
    idx = torch.cat(codes)
    k = codebook_size_of(model)
    use = codebook_usage(idx, k)
    pixels = images.shape[0] * images.shape[-2] * images.shape[-1]
    return {
        "psnr_db": psnr(rec, images.float()),
        "ssim": ssim(rec, images.float()),
        "codebook_usage_pct": 100.0 * use["usage"],
        "perplexity": use["perplexity"],
        "bpp": bits_per_pixel(idx.numel(), k, pixels),
        "bpp_entropy": entropy_bits_per_pixel(use["perplexity"], idx.numel(), pixels),
        "held_out_images": int(images.shape[0]),
    }, rec
