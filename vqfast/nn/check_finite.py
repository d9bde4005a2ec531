"""The layers' ``check_finite=True`` option: refuse an input holding NaN/Inf rows.

By default (``check_finite=False``) a non-finite row still gets a defined code (a NaN
score never beats a number) and is left out of the EMA statistics and dead-code
restarts, so it cannot poison the codebook -- but a NaN reaching the quantizer
usually means training has already diverged. ``check_finite=True`` turns that into
an immediate ValueError, raised before any kernel runs. It costs one reduction and
one device-to-host sync per forward, which is why it is opt-in.
"""
import torch


def check_finite_rows(layer: str, x: torch.Tensor, feature_dim: int, name: str = "x") -> None:
    """Raise ValueError if any row of ``x`` (the vectors along ``feature_dim``) holds a NaN or Inf,
    saying how many rows of how many."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return  # other checks report wrong types; integer and empty tensors are finite
    bad_rows = (~torch.isfinite(x.detach())).any(dim=feature_dim)
    bad = int(bad_rows.sum())
    if bad:
        raise ValueError(f"{layer}: {bad} of {bad_rows.numel()} rows of {name} are not finite (hold NaN or Inf) "
                         f"and check_finite=True refuses them; find where the NaN/Inf comes from, or pass "
                         f"check_finite=False to quantize them anyway (they are left out of the EMA update)")
