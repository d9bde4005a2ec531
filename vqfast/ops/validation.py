"""Input checks shared by every op, run once in Python before any backend.

Errors name the argument and the expected form, e.g.
``nearest_code: codebook must be 2-D (K, D), got shape (4, 8, 3)``.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_float_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_codebook(op: str, codebook) -> None:
    check_float_tensor(op, "codebook", codebook)
    if codebook.dim() != 2:
        raise ValueError(f"{op}: codebook must be 2-D (K, D), got shape {_shape(codebook)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook must hold at least one code (K >= 1), got shape {_shape(codebook)}")
    if codebook.shape[1] == 0:
        raise ValueError(f"{op}: codebook must have D >= 1, got shape {_shape(codebook)}")


def check_vectors(op: str, z, codebook) -> None:
    """z (..., D) against codebook (K, D): dtype, rank, D and device."""
    check_float_tensor(op, "z", z)
    check_codebook(op, codebook)
    if z.dim() < 1:
        raise ValueError(f"{op}: z must have shape (..., D) with at least one dimension, got a 0-d tensor")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"{op}: z's last dimension must equal the codebook's D = {codebook.shape[1]}, "
                         f"got z of shape {_shape(z)} and codebook of shape {_shape(codebook)}")
    if z.device != codebook.device:
        raise ValueError(f"{op}: z and codebook must be on the same device, got z on {z.device} "
                         f"and codebook on {codebook.device}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
