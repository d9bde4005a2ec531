"""``vqfast.nearest_code``: fused nearest-codebook search.

Each backend is a ``torch.library`` custom op with the same schema,
``(Tensor z, Tensor codebook, int metric) -> (Tensor indices, Tensor distances)``
over 2-D contiguous inputs of one dtype. This module validates once, flattens
the batch, picks the backend, and registers the fake kernel and the autograd
formula (distances are differentiable in z and the codebook; indices are not).
"""
from __future__ import annotations

import torch

from vqfast import registry
from vqfast.ops.validation import check_choice, check_vectors
from vqfast.reference import nearest_code as reference  # the module
from vqfast.reference.nearest_code import METRICS, NORM_EPS, accumulation_dtype


@torch.library.custom_op("vqfast::nearest_code_torch", mutates_args=(), device_types=("cpu", "cuda"))
def _torch_op(z: torch.Tensor, codebook: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.nearest_code(z, codebook, metric)


@torch.library.custom_op("vqfast::nearest_code_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _triton_op(z: torch.Tensor, codebook: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    from vqfast.triton.nearest_code import nearest_code_triton

    return nearest_code_triton(z, codebook, metric)


def _fake(z, codebook, metric):
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.int64), z.new_empty((n,), dtype=accumulation_dtype(z.dtype))


def _setup_context(ctx, inputs, output):
    z, codebook, metric = inputs
    idx, _ = output
    ctx.mark_non_differentiable(idx)
    ctx.metric = metric
    ctx.save_for_backward(z, codebook, idx)


def _backward(ctx, grad_idx, grad_dist):
    """Gradient of the exact distance to the chosen code (the search is piecewise constant).

    l2:     d = ||z - e||^2            dd/dz = 2 (z - e),            dd/de = -2 (z - e)
    dot:    d = -z.e                   dd/dz = -e,                   dd/de = -z
    cosine: d = 1 - c, c = zh.eh       dd/dz = -(eh - c zh)/||z||,   dd/de = -(zh - c eh)/||e||
    with zh = z / max(||z||, eps); the codebook gradient is a scatter-add over chosen codes.
    """
    z, codebook, idx = ctx.saved_tensors
    acc = accumulation_dtype(z.dtype)
    g = grad_dist.to(acc).unsqueeze(-1)
    zz, e = z.to(acc), codebook.to(acc)[idx]
    if ctx.metric == METRICS["l2"]:
        gz = 2.0 * (zz - e) * g
        ge = -gz
    elif ctx.metric == METRICS["dot"]:
        gz, ge = -e * g, -zz * g
    else:
        zn = zz.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        en = e.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        zh, eh = zz / zn, e / en
        c = (zh * eh).sum(-1, keepdim=True)
        gz, ge = -(eh - c * zh) / zn * g, -(zh - c * eh) / en * g
    gcb = torch.zeros(codebook.shape, dtype=acc, device=codebook.device).index_add_(0, idx, ge)
    return gz.to(z.dtype), gcb.to(codebook.dtype), None


def _op_for(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.vqfast.nearest_code.default
    return {"torch": torch.ops.vqfast.nearest_code_torch.default,
            "triton": torch.ops.vqfast.nearest_code_triton.default}[backend]


def _register(op_name: str) -> None:
    # The C++ op's schema is in csrc/vqfast.cpp; its fake kernel and autograd live here too.
    torch.library.register_fake(op_name)(_fake)
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


for _name in ("vqfast::nearest_code_torch", "vqfast::nearest_code_triton"):
    _register(_name)
if registry._extension()[0] is not None:
    _register("vqfast::nearest_code")


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2",
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for every vector of ``z``, and its distance.

    Args:
        z: ``(..., D)`` float16, bfloat16, float32 or float64.
        codebook: ``(K, D)``, same device; a different float dtype is promoted
            with ``z``'s (``torch.promote_types``).
        metric: ``"l2"`` (squared Euclidean), ``"cosine"`` (1 - cosine
            similarity) or ``"dot"`` (negative inner product).
        backend: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or None for
            the fastest available on ``z``'s device (see ``vqfast.backends()``).

    Returns:
        ``indices`` int64 of shape ``z.shape[:-1]`` (ties to the lowest index,
        as ``torch.argmin``) and ``distances`` of the same shape, float32
        (float64 for float64 inputs). The N x K distance matrix is never formed.
    """
    check_vectors("nearest_code", z, codebook)
    check_choice("nearest_code", "metric", metric, tuple(METRICS))
    name = registry.resolve(backend, z.device, "nearest_code")
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    batch = z.shape[:-1]
    z2 = z.reshape(-1, z.shape[-1]).to(dtype).contiguous()
    cb = codebook.to(dtype).contiguous()
    idx, dist = _op_for(name)(z2, cb, METRICS[metric])
    return idx.view(batch), dist.view(batch)
