"""What the application commands share: loading a tokenizer or a prior run, and images <-> code sequences.

A code sequence is the tokenizer's code grid ``(h, w[, Q])`` read in raster order, residual stage
fastest: the order ``CodePrior`` models and the entropy coder codes. ``grid`` is ``(h, w, Q)``
(``Q = 1`` for a single codebook).
"""
from __future__ import annotations

import os

import torch

from vqfast.metrics import codebook_size_of, downsample_factor, forward_with_indices

PRIOR_KIND = "code_prior"


def load_tokenizer(run_dir: str, device: str = "cpu"):
    """``(model, config)`` of a ``python -m vqfast train`` (or ``train-superres``) run directory."""
    from vqfast.train import load_model
    if not isinstance(run_dir, str) or not os.path.isdir(run_dir):
        raise ValueError(f"tokenizer: run directory {run_dir!r} does not exist (pass the --out of "
                         f"`python -m vqfast train`)")
    return load_model(run_dir, device)


@torch.no_grad()
def image_codes(model, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Code sequences ``(N, h * w * Q)`` of images ``(N, C, H, W)`` in [0, 1], and the grid ``(h, w, Q)``.

    One no-grad forward pass of the tokenizer per batch: the quantizer inside is vqfast's fused
    nearest-code kernel, so this is the "codes computed once" step of prior training."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, H, W) in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            _, _, idx = forward_with_indices(model, images[i:i + batch_size].to(device) * 2 - 1)
            out.append(idx.cpu())
    finally:
        model.train(was_training)
    idx = torch.cat(out)
    if idx.ndim == 3:
        idx = idx[..., None]
    n, h, w, q = idx.shape
    return idx.reshape(n, h * w * q).long(), (h, w, q)


@torch.no_grad()
def decode_sequences(model, codes: torch.Tensor, grid, batch_size: int = 64) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in [0, 1] decoded from code sequences ``(N, h * w * Q)``."""
    h, w, q = grid
    if codes.ndim != 2 or codes.shape[1] != h * w * q:
        raise ValueError(f"codes must have shape (N, {h * w * q}) for grid {tuple(grid)}, got {tuple(codes.shape)}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, codes.shape[0], batch_size):
        c = codes[i:i + batch_size].reshape(-1, h, w, q)
        if q == 1:
            c = c[..., 0]
        out.append(((model.decode_code(c.to(device)).float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def unigram_entropy_bits(codes: torch.Tensor, num_codes: int) -> float:
    """Entropy in bits of the empirical code histogram (the rate of an ideal memoryless coder)."""
    p = torch.bincount(codes.reshape(-1), minlength=num_codes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def load_prior(run_dir: str, device: str = "cpu"):
    """``(prior, config, tokenizer, tokenizer_config)`` of a ``train-prior`` run directory."""
    from vqfast import checkpoint
    from vqfast.models.prior import CodePrior
    directory, config = checkpoint.read_run_config(run_dir, "prior", "pass the --out of `python -m vqfast train-prior`")
    if config.get("kind") != PRIOR_KIND:
        raise ValueError(f"prior: {run_dir!r} is not a train-prior run (config kind {config.get('kind')!r})")
    prior = CodePrior(**config["prior"])
    checkpoint.load_into(prior, os.path.join(directory, checkpoint.MODEL_FILE))
    tokenizer, tok_config = load_tokenizer(config["tokenizer"], device)
    from vqfast.codec import model_id
    if model_id(tokenizer, tok_config).hex() != config.get("tokenizer_id"):
        raise ValueError(f"prior: the tokenizer at {config['tokenizer']!r} changed since the prior was trained "
                         f"on its codes (model id mismatch); retrain the prior")
    return prior.to(device).eval(), config, tokenizer, tok_config


def tokenizer_facts(model) -> dict:
    return {"codebook_size": codebook_size_of(model), "downsample": downsample_factor(model)}


def held_out_crops(spec: str, crop_size: int, limit: int = 256) -> torch.Tensor:
    """Held-out crops ``(N, C, S, S)`` in [0, 1] for the restoration and compression measurements.

    For the embedded data set, only crops of the held-out photographs: its held-out faces are 25 x 25
    pictures upscaled 2x, which a 2x bicubic round trip reproduces almost exactly (PSNR near 100 dB
    would swamp the mean)."""
    from vqfast import data
    if spec == "embedded":
        photos = [data._load_rgb(data._package_file(p, f)) for p, f in data.EMBEDDED_HELD_OUT]
        return data._grid_crops(photos, crop_size, limit)
    return data.load(spec, crop_size, limit).held_out
