"""``VQGANLoss``: taming-transformers' ``VQLPIPSWithDiscriminator`` (Esser et al. 2021, Sec. 3.1).

Generator step (``optimizer_idx=0``)::

    nll    = mean(pixel_weight * |x - xrec|  +  perceptual_weight * LPIPS(x, xrec))   (|.|^2 with pixel_loss="l2")
    g_loss = -mean(D(xrec))
    lambda = disc_weight * clamp(||grad_L nll|| / (||grad_L g_loss|| + 1e-4), 0, 1e4)   (L: decoder's last layer, eq. 7)
    loss   = nll + lambda * disc_factor(step) * g_loss + codebook_weight * mean(codebook_loss)

Discriminator step (``optimizer_idx=1``)::

    d_loss = disc_factor(step) * hinge(D(x), D(xrec))       (or "vanilla": softplus form)

``disc_factor(step)`` is ``disc_factor`` from ``global_step >= disc_start`` on, 0 before. Log
dictionaries carry taming's keys (``{split}/total_loss``, ``.../d_weight``, ...).

Differences from taming, all for robustness; the loss values are taming's:

* without LPIPS weights the perceptual term is disabled with a warning (taming downloads them);
* before ``disc_start`` the generator step neither runs the discriminator nor takes the two
  gradients of the adaptive weight: the term is multiplied by 0 anyway (taming computes them,
  and a non-finite gradient norm there turns the loss into NaN); ``g_loss`` and ``d_weight`` log 0;
* the pixel, perceptual and GAN terms are reduced in float32 under autocast, and a non-finite
  adaptive weight (overflowed gradients) becomes 0 instead of poisoning the step.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.losses.discriminator import NLayerDiscriminator
from vqfast.losses.lpips import LPIPS
from vqfast.losses.precision import at_least_float32

PIXEL_LOSSES = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from ``global_step >= threshold`` on, ``value`` before."""
    return value if global_step < threshold else weight


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0) -> torch.Tensor:
    """taming's eq. 7: ``disc_weight * clamp(||dnll/dL|| / (||dg/dL|| + 1e-4), 0, 1e4)``, detached,
    float32 (float64 for a float64 layer). Both graphs are retained for the caller's backward."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    dtype = torch.promote_types(last_layer.dtype, torch.float32)
    d_weight = torch.linalg.vector_norm(nll_grads.to(dtype)) / (torch.linalg.vector_norm(g_grads.to(dtype)) + 1e-4)
    d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
    d_weight = torch.where(torch.isfinite(d_weight), d_weight, torch.zeros_like(d_weight))
    return d_weight * disc_weight


class VQGANLoss(nn.Module):
    """taming's ``VQLPIPSWithDiscriminator``; ``forward(codebook_loss, inputs, reconstructions,
    optimizer_idx, global_step, last_layer, split="train") -> (loss, log_dict)``.

    disc_start: step from which the GAN terms count. codebook_weight: weight of the quantizer loss.
    pixel_loss: "l1" (taming) or "l2"; pixel_weight its weight. perceptual_weight: LPIPS weight.
    lpips_weights / lpips_vgg_weights: see :class:`vqfast.losses.lpips.LPIPS` (a full LPIPS state
    dict in lpips_weights serves as both); perceptual_model: a ready module ``(x, y) -> (B,1,1,1)``
    instead (e.g. ``LPIPS()`` on random weights in tests). With none of these and
    ``perceptual_weight > 0`` the perceptual term is disabled with a warning.
    disc_num_layers / disc_in_channels / disc_ndf / use_actnorm: the PatchGAN discriminator.
    disc_loss: "hinge" or "vanilla". disc_factor / disc_weight: taming's GAN weights.
    """

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixel_loss: str = "l1",
                 perceptual_weight: float = 1.0, lpips_weights=None, disc_num_layers: int = 3,
                 disc_in_channels: int = 3, disc_weight: float = 1.0, disc_loss: str = "hinge",
                 use_actnorm: bool = False, *, pixel_weight: float = 1.0, disc_factor: float = 1.0,
                 disc_ndf: int = 64, lpips_vgg_weights=None, perceptual_model: nn.Module | None = None):
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"VQGANLoss: pixel_loss must be one of {PIXEL_LOSSES}, got {pixel_loss!r}")
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"VQGANLoss: disc_loss must be one of {DISC_LOSSES}, got {disc_loss!r}")
        if not isinstance(disc_start, int) or isinstance(disc_start, bool) or disc_start < 0:
            raise ValueError(f"VQGANLoss: disc_start must be a non-negative int, got {disc_start!r}")
        for name, value in (("codebook_weight", codebook_weight), ("perceptual_weight", perceptual_weight),
                            ("disc_weight", disc_weight), ("pixel_weight", pixel_weight),
                            ("disc_factor", disc_factor)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"VQGANLoss: {name} must be a non-negative number, got {value!r}")
        self.codebook_weight = float(codebook_weight)
        self.pixel_loss = pixel_loss
        self.pixel_weight = float(pixel_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual_loss: nn.Module | None = None
        if self.perceptual_weight > 0:
            if perceptual_model is not None:
                self.perceptual_loss = perceptual_model
            elif lpips_weights is not None:
                self.perceptual_loss = LPIPS(lpips_weights, lpips_vgg_weights)
                if not self.perceptual_loss.pretrained:
                    raise ValueError("VQGANLoss: lpips_weights holds only the LPIPS linear layers; pass "
                                     "lpips_vgg_weights (torchvision's VGG16 weights file, or 'download')")
            else:
                warnings.warn("VQGANLoss: no LPIPS weights given (lpips_weights=None), so the perceptual term is "
                              "DISABLED and only the pixel loss is used. Pass lpips_weights (LPIPS v0.1 vgg.pth) "
                              "and lpips_vgg_weights (torchvision VGG16 weights, or 'download') to enable it.",
                              UserWarning, stacklevel=2)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = float(disc_factor)
        self.discriminator_weight = float(disc_weight)

    def calculate_adaptive_weight(self, nll_loss, g_loss, last_layer):
        return adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)

    def _check(self, inputs, reconstructions, optimizer_idx, global_step):
        for name, t in (("inputs", inputs), ("reconstructions", reconstructions)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 4:
                raise TypeError(f"VQGANLoss: {name} must be a float tensor (B, C, H, W), got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"VQGANLoss: inputs {tuple(inputs.shape)} and reconstructions "
                             f"{tuple(reconstructions.shape)} must have the same shape")
        if optimizer_idx not in (0, 1):
            raise ValueError(f"VQGANLoss: optimizer_idx must be 0 (generator) or 1 (discriminator), got {optimizer_idx!r}")
        if not isinstance(global_step, int) or isinstance(global_step, bool):
            raise TypeError(f"VQGANLoss: global_step must be an int, got {type(global_step).__name__}")

    def forward(self, codebook_loss, inputs, reconstructions, optimizer_idx, global_step, last_layer=None,
                cond=None, split="train"):
        self._check(inputs, reconstructions, optimizer_idx, global_step)
        if cond is not None:
            raise NotImplementedError("VQGANLoss: cond (a conditional discriminator) is not supported")
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 1:
            return self._discriminator_step(inputs, reconstructions, disc_factor, split)

        x, xrec = inputs.contiguous(), reconstructions.contiguous()
        diff = at_least_float32(x) - at_least_float32(xrec)
        rec_loss = self.pixel_weight * (diff.abs() if self.pixel_loss == "l1" else diff ** 2)
        if self.perceptual_loss is not None:
            p_loss = at_least_float32(self.perceptual_loss(x, xrec))
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=x.device)
        nll_loss = torch.mean(rec_loss)

        zero = torch.zeros((), device=x.device)
        if disc_factor > 0:
            g_loss = -torch.mean(at_least_float32(self.discriminator(xrec)))
            if nll_loss.requires_grad and g_loss.requires_grad and torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("VQGANLoss: last_layer (the decoder's last weight, model.get_last_layer()) "
                                     "is required for the generator step once the discriminator is on")
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            else:  # evaluation without a graph: taming's fallback
                d_weight = zero
        else:
            g_loss, d_weight = zero, zero
        if codebook_loss is None:
            codebook_loss = zero
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * at_least_float32(codebook_loss).mean()
        log = {f"{split}/total_loss": loss.detach().clone(),
               f"{split}/quant_loss": at_least_float32(codebook_loss.detach()).mean(),
               f"{split}/nll_loss": nll_loss.detach(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor),
               f"{split}/g_loss": g_loss.detach()}
        return loss, log

    def _discriminator_step(self, inputs, reconstructions, disc_factor, split):
        logits_real = at_least_float32(self.discriminator(inputs.contiguous().detach()))
        logits_fake = at_least_float32(self.discriminator(reconstructions.contiguous().detach()))
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.detach().clone(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log
