"""Precision policy of the losses under autocast."""
from __future__ import annotations

import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it already is: loss reductions of half-precision activations
    lose the small terms (and overflow float16), while a float64 reference must stay float64."""
    return t if t.dtype == torch.float64 else t.float()
