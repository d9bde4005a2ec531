"""``vqfast.residual_nearest_code``: all Q stages of a residual (multi-stage) search in one op.

Each backend is a ``torch.library`` custom op with the schema in csrc/vqfast.cpp,
``(Tensor z, Tensor codebooks, int metric) -> (Tensor indices, Tensor distances)``
over a 2-D contiguous ``z`` (N, D) and contiguous ``codebooks`` (Q, K, D) of one
dtype. This module validates once, flattens the batch, picks the backend and
registers the fake kernels. There is no autograd formula: the search is
piecewise constant, and layers compute their differentiable outputs from the
indices (vqfast.nn.ResidualVQ).
"""
from __future__ import annotations

import torch

from vqfast import registry
from vqfast.ops.validation import _shape, check_choice, check_float_tensor
from vqfast.reference import residual as reference  # the module
from vqfast.reference.nearest_code import METRICS, accumulation_dtype

OP = "residual_nearest_code"


@torch.library.custom_op("vqfast::residual_nearest_code_torch", mutates_args=(), device_types=("cpu", "cuda"))
def _torch_op(z: torch.Tensor, codebooks: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.residual_nearest_code(z, codebooks, metric)


@torch.library.custom_op("vqfast::residual_nearest_code_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _triton_op(z: torch.Tensor, codebooks: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    from vqfast.triton.residual_nearest_code import residual_nearest_code_triton

    return residual_nearest_code_triton(z, codebooks, metric)


def _fake(z, codebooks, metric):
    shape = (z.shape[0], codebooks.shape[0])
    return z.new_empty(shape, dtype=torch.int64), z.new_empty(shape, dtype=accumulation_dtype(z.dtype))


for _name in ("vqfast::residual_nearest_code_torch", "vqfast::residual_nearest_code_triton"):
    torch.library.register_fake(_name)(_fake)
# The C++ op's schema is in csrc/vqfast.cpp; its fake kernel lives here. An extension built
# before that schema existed lacks the op, and then the cpu/cuda backends report it missing.
if registry._extension()[0] is not None and hasattr(torch.ops.vqfast, "residual_nearest_code"):
    torch.library.register_fake("vqfast::residual_nearest_code")(_fake)


def _op_for(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.vqfast.residual_nearest_code.default
    return {"torch": torch.ops.vqfast.residual_nearest_code_torch.default,
            "triton": torch.ops.vqfast.residual_nearest_code_triton.default}[backend]


def check_codebooks(op: str, z, codebooks) -> None:
    """z (..., D) against codebooks (Q, K, D): dtype, rank, sizes, D and device."""
    check_float_tensor(op, "z", z)
    check_float_tensor(op, "codebooks", codebooks)
    if codebooks.dim() != 3:
        raise ValueError(f"{op}: codebooks must be 3-D (Q, K, D), got shape {_shape(codebooks)}")
    q, k, d = codebooks.shape
    if q == 0:
        raise ValueError(f"{op}: codebooks must hold at least one stage (Q >= 1), got shape {_shape(codebooks)}")
    if k == 0:
        raise ValueError(f"{op}: codebooks must hold at least one code per stage (K >= 1), "
                         f"got shape {_shape(codebooks)}")
    if d == 0:
        raise ValueError(f"{op}: codebooks must have D >= 1, got shape {_shape(codebooks)}")
    if z.dim() < 1:
        raise ValueError(f"{op}: z must have shape (..., D) with at least one dimension, got a 0-d tensor")
    if z.shape[-1] != d:
        raise ValueError(f"{op}: z's last dimension must equal the codebooks' D = {d}, "
                         f"got z of shape {_shape(z)} and codebooks of shape {_shape(codebooks)}")
    if z.device != codebooks.device:
        raise ValueError(f"{op}: z and codebooks must be on the same device, got z on {z.device} "
                         f"and codebooks on {codebooks.device}")


def residual_nearest_code(z: torch.Tensor, codebooks: torch.Tensor, *, metric: str = "l2",
                          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (multi-stage) nearest-code search: Q stages in one call.

    Stage q picks the code of ``codebooks[q]`` nearest to the residual
    ``r_q`` (``r_0 = z``, ``r_{q+1} = r_q - codebooks[q][i_q]``), the residual
    kept in float32 (float64 for float64 inputs) between stages. To run only the
    first q stages, pass ``codebooks[:q]``.

    Args:
        z: ``(..., D)`` float16, bfloat16, float32 or float64.
        codebooks: ``(Q, K, D)``, same device; a different float dtype is
            promoted with ``z``'s (``torch.promote_types``).
        metric: ``"l2"`` (squared Euclidean), ``"cosine"`` (1 - cosine
            similarity) or ``"dot"`` (negative inner product), as in
            :func:`vqfast.nearest_code`, ties to the lowest index.
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None for
            the fastest available on ``z``'s device (see ``vqfast.backends()``).

    Returns:
        ``indices`` int64 of shape ``(..., Q)`` and ``distances`` of the same
        shape (the distance of ``r_q`` to its chosen code), float32 (float64 for
        float64 inputs).

    Not differentiable: the inputs are detached and the outputs carry no
    gradient. Compute differentiable outputs from the indices.
    """
    check_codebooks(OP, z, codebooks)
    check_choice(OP, "metric", metric, tuple(METRICS))
    name = registry.resolve(backend, z.device, OP)
    dtype = torch.promote_types(z.dtype, codebooks.dtype)
    batch = z.shape[:-1]
    z2 = z.detach().reshape(-1, z.shape[-1]).to(dtype).contiguous()
    cb = codebooks.detach().to(dtype).contiguous()
    idx, dist = _op_for(name)(z2, cb, METRICS[metric])
    nq = codebooks.shape[0]
    return idx.view(*batch, nq), dist.view(*batch, nq)
