"""PatchGAN discriminator (pix2pix's ``NLayerDiscriminator``) as taming-transformers uses it.

Same layers and state_dict keys as ``taming.modules.discriminator.model.NLayerDiscriminator``
(``main.<i>.weight``; ActNorm's ``loc`` / ``scale`` / ``initialized``), so the ``loss.discriminator``
entries of a taming checkpoint load unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


class ActNorm(nn.Module):
    """Per-channel affine ``scale * (x + loc)``, initialized on the first training batch so the
    output has zero mean and unit variance per channel (Glow, Kingma & Dhariwal 2018)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).float()
        self.loc.copy_(-flat.mean(1).reshape(1, -1, 1, 1))
        self.scale.copy_(1 / (flat.std(1).reshape(1, -1, 1, 1) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """pix2pix's init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and zero bias."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``n_layers`` stride-2 4x4 convs (width ``ndf * min(2**n, 8)``), one stride-1
    conv, then a 1-channel map of real/fake logits, one per overlapping patch. Normalization is
    BatchNorm (default) or ActNorm; convs before a BatchNorm carry no bias, as in taming."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        for name, value in (("input_nc", input_nc), ("ndf", ndf), ("n_layers", n_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NLayerDiscriminator: {name} must be a positive int, got {value!r}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        bias = bool(use_actnorm)
        seq: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=bias), norm(ndf * mult),
                    nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=bias), norm(ndf * mult),
                nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*seq)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
