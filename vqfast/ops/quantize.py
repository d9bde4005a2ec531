"""``vqfast.quantize``: search, gather, both losses and their gradients, fused.

Formulas: ``vqfast/reference/quantize.py``. Each backend provides two ops with
the same schemas::

    quantize_forward(z, codebook, metric, estimator, through_output)
        -> (z_q, indices, commit_loss, codebook_loss)
    quantize_backward(grad_zq, grad_commit, grad_codebook_loss, z, codebook, indices,
                      metric, estimator, through_output, deterministic)
        -> (grad_z, grad_codebook)

The forward op carries the estimator flags only so that its autograd formula
(registered here, once for every backend) can hand them to the backward op.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from vqfast import registry
from vqfast.ops.validation import check_choice, check_vectors
from vqfast.reference import quantize as reference
from vqfast.reference.nearest_code import METRICS, accumulation_dtype
from vqfast.reference.quantize import ESTIMATORS


class QuantizeResult(NamedTuple):
    z_q: torch.Tensor
    indices: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor


def _losses_from_sq_err(sq_err: torch.Tensor, numel: int):
    loss = sq_err / max(numel, 1)
    return loss, loss.clone()


@torch.library.custom_op("vqfast::quantize_forward_torch", mutates_args=(), device_types=("cpu", "cuda"))
def _forward_torch(z: torch.Tensor, codebook: torch.Tensor, metric: int, estimator: int,
                   through_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    zq, idx, sq_err = reference.quantize_forward(z, codebook, metric)
    return (zq, idx, *_losses_from_sq_err(sq_err, z.numel()))


@torch.library.custom_op("vqfast::quantize_backward_torch", mutates_args=(), device_types=("cpu", "cuda"))
def _backward_torch(grad_zq: torch.Tensor, grad_commit: torch.Tensor, grad_codebook_loss: torch.Tensor,
                    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: int, estimator: int,
                    through_output: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.quantize_backward(grad_zq, grad_commit, grad_codebook_loss, z, codebook, indices, metric,
                                       estimator, through_output)


@torch.library.custom_op("vqfast::quantize_forward_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _forward_triton(z: torch.Tensor, codebook: torch.Tensor, metric: int, estimator: int,
                    through_output: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vqfast.triton.quantize import quantize_forward_triton

    return quantize_forward_triton(z, codebook, metric)


@torch.library.custom_op("vqfast::quantize_backward_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _backward_triton(grad_zq: torch.Tensor, grad_commit: torch.Tensor, grad_codebook_loss: torch.Tensor,
                     z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: int, estimator: int,
                     through_output: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from vqfast.triton.quantize import quantize_backward_triton

    return quantize_backward_triton(grad_zq, grad_commit, grad_codebook_loss, z, codebook, indices, metric,
                                    estimator, through_output, deterministic)


def _fake_forward(z, codebook, metric, estimator, through_output):
    acc = accumulation_dtype(z.dtype)
    return (torch.empty_like(z), z.new_empty((z.shape[0],), dtype=torch.int64),
            z.new_empty((), dtype=acc), z.new_empty((), dtype=acc))


def _fake_backward(grad_zq, grad_commit, grad_codebook_loss, z, codebook, indices, metric, estimator,
                   through_output, deterministic):
    return torch.empty_like(z), torch.empty_like(codebook)


BACKWARD_OF = {
    "vqfast::quantize_forward": "quantize_backward",
    "vqfast::quantize_forward_torch": "quantize_backward_torch",
    "vqfast::quantize_forward_triton": "quantize_backward_triton",
}


def _setup_context(ctx, inputs, output):
    z, codebook, metric, estimator, through_output = inputs
    _, idx, _, _ = output
    ctx.mark_non_differentiable(idx)
    ctx.flags = (metric, estimator, through_output)
    ctx.save_for_backward(z, codebook, idx)


def _make_backward(backward_op_name: str):
    def backward(ctx, grad_zq, grad_idx, grad_commit, grad_codebook_loss):
        z, codebook, idx = ctx.saved_tensors
        metric, estimator, through_output = ctx.flags
        op = getattr(torch.ops.vqfast, backward_op_name).default
        gz, gcb = op(grad_zq.contiguous(), grad_commit, grad_codebook_loss, z, codebook, idx, metric, estimator,
                     through_output, torch.are_deterministic_algorithms_enabled())
        return gz, gcb, None, None, None

    return backward


def _register(forward_name: str) -> None:
    backward_name = BACKWARD_OF[forward_name]
    torch.library.register_fake(forward_name)(_fake_forward)
    torch.library.register_fake(f"vqfast::{backward_name}")(_fake_backward)
    torch.library.register_autograd(forward_name, _make_backward(backward_name), setup_context=_setup_context)


for _name in ("vqfast::quantize_forward_torch", "vqfast::quantize_forward_triton"):
    _register(_name)
if registry.extension_has_op("quantize_forward"):
    _register("vqfast::quantize_forward")


def forward_op_for(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.vqfast.quantize_forward.default
    return {"torch": torch.ops.vqfast.quantize_forward_torch.default,
            "triton": torch.ops.vqfast.quantize_forward_triton.default}[backend]


def backward_op_for(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.vqfast.quantize_backward.default
    return {"torch": torch.ops.vqfast.quantize_backward_torch.default,
            "triton": torch.ops.vqfast.quantize_backward_triton.default}[backend]


def quantize(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", estimator: str = "ste",
             codebook_grad_through_output: bool = False, backend: str | None = None) -> QuantizeResult:
    """Quantize ``z`` to its nearest codes, with a straight-through or rotation-trick gradient.

    Args:
        z: ``(..., D)`` float tensor.
        codebook: ``(K, D)``; gets gradients from ``codebook_loss`` (and from
            ``z_q`` when ``codebook_grad_through_output``).
        metric: ``"l2"``, ``"cosine"`` (z and codes are compared, and quantized,
            as unit vectors) or ``"dot"``.
        estimator: ``"ste"`` (straight-through) or ``"rotation"`` (rotation trick).
        codebook_grad_through_output: also send ``z_q``'s gradient to the chosen
            codes, as a learnable codebook does.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None (fastest here).

    Returns:
        ``QuantizeResult(z_q, indices, commit_loss, codebook_loss)``: ``z_q`` like
        ``z`` (its value is the chosen code, normalized for cosine), ``indices``
        int64 ``z.shape[:-1]``, and the two scalar losses
        ``mean((z - sg(e))^2)`` and ``mean((sg(z) - e)^2)`` (float32; float64 for
        float64 input). Forward and backward are each one fused pass; the N x K
        matrix is never formed. With ``torch.use_deterministic_algorithms(True)``
        the codebook gradient is summed in a fixed order on every backend.
    """
    check_vectors("quantize", z, codebook)
    check_choice("quantize", "metric", metric, tuple(METRICS))
    check_choice("quantize", "estimator", estimator, tuple(ESTIMATORS))
    if not isinstance(codebook_grad_through_output, bool):
        raise TypeError(f"quantize: codebook_grad_through_output must be a bool, got "
                        f"{type(codebook_grad_through_output).__name__}")
    name = registry.resolve(backend, z.device, "quantize")
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    shape = z.shape
    z2 = z.reshape(-1, shape[-1]).to(dtype).contiguous()
    cb = codebook.to(dtype).contiguous()
    zq, idx, commit, cb_loss = forward_op_for(name)(z2, cb, METRICS[metric], ESTIMATORS[estimator],
                                                    codebook_grad_through_output)
    return QuantizeResult(zq.view(shape), idx.view(shape[:-1]), commit, cb_loss)
