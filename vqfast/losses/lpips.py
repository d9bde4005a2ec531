"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, as taming-transformers uses it.

Same modules and state_dict keys as ``taming.modules.losses.lpips.LPIPS`` (``scaling_layer``,
``net.slice1..5`` over torchvision's VGG16 ``features``, ``lin0..4.model.1.weight``), so the
``loss.perceptual_loss.*`` entries of a taming checkpoint load unchanged.

Weights are never downloaded implicitly. Two files make a pretrained LPIPS:

* the linear calibration layers, ``vgg.pth`` of LPIPS v0.1 (keys ``lin<k>.model.1.weight``; the
  same file taming downloads, and the one in the ``lpips`` package under ``weights/v0.1/``);
* the VGG16 backbone, torchvision's ImageNet weights (``vgg16-397923af.pth``, keys
  ``features.<i>.weight``), or ``vgg_weights="download"`` to fetch them through torchvision.

A full LPIPS state dict (``net.*`` and ``lin*`` together, e.g. taming's ``loss.perceptual_loss``
entries) serves as both. Without weights the network is randomly initialized (``pretrained`` is
False): usable for tests, meaningless as a perceptual loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.checkpoint import load_state_dict
from vqfast.losses.precision import at_least_float32

VGG_CHANNELS = (64, 128, 256, 512, 512)
# VGG16 ``features`` index ranges of the five slices, ending at relu1_2 .. relu5_3.
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet-normalized input VGG expects."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Dropout, then a bias-free 1x1 conv to one channel (LPIPS's learned per-channel weights)."""

    def __init__(self, chn_in: int, use_dropout: bool = True):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        self.model = nn.Sequential(*layers, nn.Conv2d(chn_in, 1, 1, bias=False))


class VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` cut into the five slices LPIPS reads."""

    def __init__(self):
        super().__init__()
        # torchvision's VGG16 layer list without its 120M-parameter classifier head, which LPIPS
        # never uses (building it alone takes seconds); same modules and indices as vgg16().features.
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"], batch_norm=False)
        for k, (lo, hi) in enumerate(_SLICES, start=1):
            s = nn.Sequential()
            for i in range(lo, hi):
                s.add_module(str(i), features[i])
            setattr(self, f"slice{k}", s)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            out.append(x)
        return out


def _vgg_state_dict(vgg_weights) -> dict[str, torch.Tensor]:
    """torchvision VGG16 weights (``features.<i>.*``) renamed to ``net.slice<k>.<i>.*``."""
    if isinstance(vgg_weights, str) and vgg_weights == "download":
        from torchvision.models import VGG16_Weights

        sd = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    else:
        sd = load_state_dict(vgg_weights)
    out = {}
    for name, value in sd.items():
        if name.startswith("net.slice"):
            out[name] = value
            continue
        if not name.startswith("features."):
            continue  # the classifier head, unused
        i = int(name.split(".")[1])
        k = next(k for k, (lo, hi) in enumerate(_SLICES, start=1) if lo <= i < hi) if i < 30 else None
        if k is not None:
            out[f"net.slice{k}.{name[len('features.'):]}"] = value
    return out


def _normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS distance between image batches in [-1, 1]: ``forward(x, y) -> (B, 1, 1, 1)``.

    lin_weights: the calibration layers (path or state dict), or a full LPIPS state dict.
    vgg_weights: torchvision's VGG16 weights (path or state dict), or ``"download"``.
    Parameters are frozen; the module stays in eval mode (dropout off) whatever its parent does.
    """

    def __init__(self, lin_weights=None, vgg_weights=None, *, use_dropout: bool = True):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, c in enumerate(VGG_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c, use_dropout=use_dropout))
        has_lin = has_vgg = False
        if lin_weights is not None:
            sd = load_state_dict(lin_weights)
            lin = {k: v for k, v in sd.items() if k.startswith("lin")}
            if len(lin) != len(VGG_CHANNELS):
                raise ValueError(f"LPIPS: lin_weights must hold lin0..lin4.model.1.weight, found {sorted(lin)}")
            net = {k: v for k, v in sd.items() if k.startswith("net.")}
            self._load(lin)
            has_lin = True
            if net:
                self._load(net)
                has_vgg = True
        if vgg_weights is not None:
            self._load(_vgg_state_dict(vgg_weights))
            has_vgg = True
        self.pretrained = has_lin and has_vgg
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _load(self, sd: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        bad = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"LPIPS: weights do not match the VGG16 LPIPS network: {bad[:5]}")
        self.load_state_dict(sd, strict=False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a fixed metric: dropout stays off, as taming's .eval() intends

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        # The VGG runs under the caller's autocast; the rest in float32 with autocast off: the sum
        # of 512 squared activations overflows float16.
        with torch.autocast(device_type=x.device.type, enabled=False):
            for k, (a, b) in enumerate(zip(fx, fy)):
                d = (_normalize(at_least_float32(a)) - _normalize(at_least_float32(b))) ** 2
                lin = getattr(self, f"lin{k}").model[-1]  # its Dropout is off: LPIPS stays in eval mode
                total = total + F.conv2d(d, lin.weight.to(d.dtype)).mean(dim=(2, 3), keepdim=True)
        return total
