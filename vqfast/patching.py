"""``vqfast.patch(model)``: swap the quantizers of an existing model for vqfast's.

Walks ``model`` and replaces every module whose class is one of the known quantizers with the
vqfast equivalent, built with the same configuration and loaded with the same weights and
buffers (``load_state_dict(strict=True)``), on the same device and dtype, in the same
train/eval mode:

============================================================  ==========================================
original                                                      vqfast
============================================================  ==========================================
taming ``taming.modules.vqvae.quantize.VectorQuantizer``       ``vqfast.compat.taming.VectorQuantizer``
taming ``...VectorQuantizer2``                                 ``vqfast.compat.taming.VectorQuantizer2``
taming ``...EMAVectorQuantizer``                               ``vqfast.compat.taming.EMAVectorQuantizer``
diffusers ``diffusers.models.autoencoders.vae.VectorQuantizer``  ``vqfast.compat.diffusers.VectorQuantizer``
vector-quantize-pytorch ``VectorQuantize``                      ``vqfast.nn.VectorQuantize``
vector-quantize-pytorch ``ResidualVQ`` / ``GroupedResidualVQ``   ``vqfast.nn.ResidualVQ`` / ``GroupedResidualVQ``
============================================================  ==========================================

Classes are recognised by their module and qualified name, so patching never imports a peer
package. The configuration of a vector-quantize-pytorch layer is read back from its attributes
(it does not keep its constructor arguments); a configuration vqfast does not implement is not
replaced: it is listed in ``PatchReport.skipped`` with the reason (and a warning), or raises
``NotImplementedError`` with ``strict=True``. Nothing is skipped silently.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` did: ``replaced`` and ``skipped`` are lists of
    ``(module path, original class, vqfast class or reason)``."""

    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"vqfast.patch: replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        lines += [f"  {path or '<root>'}: {old} -> {new}" for path, old, new in self.replaced]
        lines += [f"  {path or '<root>'}: {old} kept ({why})" for path, old, why in self.skipped]
        return "\n".join(lines)


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


# -- builders: original module -> vqfast module with the same configuration ---------------------


def _taming_v1(m):
    from vqfast.compat.taming import VectorQuantizer

    return VectorQuantizer(m.n_e, m.e_dim, m.beta)


def _remap_kwargs(m) -> dict:
    if getattr(m, "remap", None) is None:
        return {}
    # The remap file's contents live in the `used` buffer (loaded below); the path is only read
    # at construction, so the original path must still exist.
    unknown = m.unknown_index if m.unknown_index != m.used.shape[0] else "extra"
    return {"remap": m.remap, "unknown_index": unknown}


def _taming_v2(m):
    from vqfast.compat.taming import VectorQuantizer2

    return VectorQuantizer2(m.n_e, m.e_dim, m.beta, sane_index_shape=m.sane_index_shape, legacy=m.legacy,
                            **_remap_kwargs(m))


def _taming_ema(m):
    from vqfast.compat.taming import EMAVectorQuantizer

    return EMAVectorQuantizer(m.num_tokens, m.codebook_dim, m.beta, decay=m.embedding.decay, eps=m.embedding.eps,
                              **_remap_kwargs(m))


def _diffusers(m):
    from vqfast.compat.diffusers import VectorQuantizer

    return VectorQuantizer(m.n_e, m.vq_embed_dim, m.beta, sane_index_shape=m.sane_index_shape, legacy=m.legacy,
                           **_remap_kwargs(m))


def _vq_kwargs(m) -> dict:
    """vector-quantize-pytorch VectorQuantize -> its constructor arguments, read from attributes."""
    cb = m._codebook
    sample = getattr(cb, "gumbel_sample", None)
    sample_kw = getattr(sample, "keywords", {}) or {}
    project_in = m.project_in
    layernorm = isinstance(project_in, nn.Sequential) and any(isinstance(p, nn.LayerNorm) for p in project_in)
    unsupported = {
        "directional_reparam": getattr(m, "directional_reparam", False),
        "vq_bridge": getattr(cb, "vq_bridge", None) is not None,
        "affine_param": getattr(cb, "affine_param", False),
        "in_place_codebook_optimizer": getattr(m, "in_place_codebook_optimizer", None) is not None,
        "codebook_diversity_loss_weight": getattr(m, "has_codebook_diversity_loss", False),
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise NotImplementedError(f"{', '.join(bad)} is not supported by vqfast.nn.VectorQuantize")
    return dict(
        dim=m.dim, codebook_size=m.codebook_size, codebook_dim=cb.embed.shape[-1], heads=m.heads,
        separate_codebook_per_head=m.separate_codebook_per_head, decay=cb.decay, eps=cb.eps,
        freeze_codebook=m.freeze_codebook, kmeans_init=not bool(cb.initted.item()), kmeans_iters=cb.kmeans_iters,
        use_cosine_sim=m.use_cosine_sim, layernorm_after_project_in=layernorm,
        threshold_ema_dead_code=cb.threshold_ema_dead_code, channel_last=m.channel_last,
        accept_image_fmap=m.accept_image_fmap, accept_3d_fmap=getattr(m, "accept_3d_fmap", False),
        commitment_weight=m.commitment_weight, commitment_use_cross_entropy_loss=m.commitment_use_cross_entropy_loss,
        orthogonal_reg_weight=m.orthogonal_reg_weight,
        orthogonal_reg_active_codes_only=m.orthogonal_reg_active_codes_only,
        orthogonal_reg_max_codes=m.orthogonal_reg_max_codes,
        stochastic_sample_codes=bool(sample_kw.get("stochastic", False)),
        sample_codebook_temp=cb.sample_codebook_temp,
        straight_through=bool(sample_kw.get("straight_through", False)), rotation_trick=m.rotation_trick,
        sync_codebook=bool(cb.use_ddp), ema_update=cb.ema_update, manual_ema_update=cb.manual_ema_update,
        learnable_codebook=m.learnable_codebook, sync_update_v=m.sync_update_v,
        return_zeros_for_masked_padding=m.return_zeros_for_masked_padding,
        route_gradients_to_input=m.route_gradients_to_input)


def _vq(m):
    from vqfast.nn import VectorQuantize

    return VectorQuantize(**_vq_kwargs(m))


# Stage arguments a ResidualVQ sets on its stages itself (from its own arguments).
_RVQ_OWNED = ("dim", "codebook_size", "codebook_dim", "accept_image_fmap", "return_zeros_for_masked_padding",
              "manual_ema_update")


def _rvq_kwargs(m) -> dict:
    if getattr(m, "diveq", False):
        raise NotImplementedError("diveq is not supported by vqfast.nn.ResidualVQ")
    if getattr(m, "beam_size", None) is not None:
        raise NotImplementedError("beam_size is not supported by vqfast.nn.ResidualVQ")
    stage = _vq_kwargs(m.layers[0])
    if not stage.pop("manual_ema_update") or not m.shared_codebook:
        stage["manual_ema_update"] = m.layers[0]._codebook.manual_ema_update
    for name in _RVQ_OWNED[:-1]:
        stage.pop(name)
    if getattr(m, "implicit_neural_codebook", False):
        stage.pop("learnable_codebook")
        stage.pop("ema_update")
    dim = m.project_in.in_features if m.has_projections else m.codebook_dim
    return dict(stage, dim=dim, num_quantizers=m.num_quantizers, codebook_size=tuple(m.codebook_sizes),
                codebook_dim=m.codebook_dim, shared_codebook=m.shared_codebook,
                quantize_dropout=m.quantize_dropout, quantize_dropout_cutoff_index=m.quantize_dropout_cutoff_index,
                quantize_dropout_multiple_of=m.quantize_dropout_multiple_of, accept_image_fmap=m.accept_image_fmap,
                implicit_neural_codebook=getattr(m, "implicit_neural_codebook", False),
                quant_grad_frac=m.quant_grad_frac,
                return_zeros_for_masked_padding=m.return_zeros_for_masked_padding)


def _rvq(m):
    from vqfast.nn import ResidualVQ

    kwargs = _rvq_kwargs(m)
    if not kwargs["implicit_neural_codebook"]:
        kwargs.pop("implicit_neural_codebook")
    return ResidualVQ(**kwargs)


def _grouped_rvq(m):
    from vqfast.nn import GroupedResidualVQ

    kwargs = _rvq_kwargs(m.rvqs[0])
    kwargs.pop("dim")
    kwargs.pop("accept_image_fmap")
    if not kwargs["implicit_neural_codebook"]:
        kwargs.pop("implicit_neural_codebook")
    return GroupedResidualVQ(dim=m.dim, groups=m.groups, accept_image_fmap=m.accept_image_fmap, **kwargs)


_VQP = "vector_quantize_pytorch"
BUILDERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "taming.modules.vqvae.quantize.VectorQuantizer": _taming_v1,
    "taming.modules.vqvae.quantize.VectorQuantizer2": _taming_v2,
    "taming.modules.vqvae.quantize.EMAVectorQuantizer": _taming_ema,
    "diffusers.models.autoencoders.vae.VectorQuantizer": _diffusers,
    f"{_VQP}.vector_quantize_pytorch.VectorQuantize": _vq,
    f"{_VQP}.residual_vq.ResidualVQ": _rvq,
    f"{_VQP}.residual_vq.GroupedResidualVQ": _grouped_rvq,
}


def _placement(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in module.parameters():
        return t.device, t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _replacement(old: nn.Module, build) -> nn.Module:
    new = build(old)
    device, dtype = _placement(old)
    if device is not None:
        new = new.to(device=device, dtype=dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    new.train(old.training)
    for name, p in old.named_parameters():  # frozen parameters stay frozen
        new_p = new.get_parameter(name) if _has_parameter(new, name) else None
        if new_p is not None:
            new_p.requires_grad_(p.requires_grad)
    return new


def _set_backend(module: nn.Module, backend: str) -> None:
    from vqfast.compat.taming import EMAVectorQuantizer, VectorQuantizer2
    from vqfast.nn import VectorQuantize

    for m in module.modules():
        if isinstance(m, (VectorQuantize, VectorQuantizer2, EMAVectorQuantizer)):
            m.backend = backend


def _has_parameter(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def patch(model: nn.Module, *, strict: bool = False, backend: str | None = None) -> PatchReport:
    """Replace, in place, every known quantizer inside ``model`` with its vqfast equivalent.

    Args:
        model: any ``nn.Module``; the model itself is replaced only through its children
            (patch the parent to replace a root quantizer, or call the builders directly).
        strict: raise ``NotImplementedError`` for a quantizer whose configuration vqfast does not
            implement, instead of keeping it and listing it in ``report.skipped``.
        backend: vqfast backend for the new modules (None: the fastest available).

    Returns:
        a ``PatchReport`` of what was replaced and what was kept, and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    seen: dict[int, nn.Module] = {}  # a quantizer shared by several parents is replaced once

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            key = _qualname(child)
            build = BUILDERS.get(key)
            if build is None:
                visit(child, path)
                continue
            if id(child) in seen:
                setattr(parent, name, seen[id(child)])
                continue
            try:
                new = _replacement(child, build)
            except NotImplementedError as e:
                if strict:
                    raise NotImplementedError(f"vqfast.patch: {path} ({key}): {e}") from e
                warnings.warn(f"vqfast.patch: kept {path} ({key}): {e}", stacklevel=3)
                report.skipped.append((path, key, str(e)))
                continue
            if backend is not None:
                _set_backend(new, backend)
            seen[id(child)] = new
            setattr(parent, name, new)
            report.replaced.append((path, key, f"{type(new).__module__}.{type(new).__qualname__}"))

    visit(model, "")
    return report
