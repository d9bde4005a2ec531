"""Image-generation metrics the field reports: FID and Inception Score.

Both need the Inception network that FID was defined with (pytorch-fid's port of the 2015
TensorFlow weights, ``pt_inception-2015-12-05-6726825d.pth``). This machine cannot download it,
so the weights are a local file the user supplies (``--inception-weights PATH``, or the
``VQFAST_INCEPTION_WEIGHTS`` environment variable); without one, ``inception_or_none`` returns
None with a message naming the file to provide, and callers skip FID/IS instead of failing.

The network is pytorch-fid's (``pytorch_fid.inception.fid_inception_v3``: torchvision's
Inception v3 with the FID-specific blocks), loaded from the local file; the Frechet distance is
pytorch-fid's ``calculate_frechet_distance`` in float64; the Inception Score is torchmetrics'
``InceptionScore`` over the network's 1008-way logits.
"""
from __future__ import annotations

import os
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_ENV = "VQFAST_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (f"FID/IS need pytorch-fid's Inception weights as a local file ({WEIGHTS_FILE}, from "
                "https://github.com/mseitzer/pytorch-fid/releases): pass --inception-weights PATH or set "
                f"{WEIGHTS_ENV}=PATH")


class InceptionFeatures(nn.Module):
    """FID Inception v3: images in [0, 1], any size, -> (pool3 features (B, 2048), logits (B, 1008))."""

    def __init__(self, net: nn.Module, size: int = 299):
        super().__init__()
        if size < 75:
            raise ValueError(f"size must be >= 75 (Inception v3's smallest input), got {size}")
        self.net = net.eval()
        self.size = size  # 299 is the standard; smaller sizes only for tests of the plumbing

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 3, H, W) (or 1 channel), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # pytorch-fid's normalize_input
        n = self.net
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        feats = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return feats, n.fc(feats)


def build_inception(weights: str | os.PathLike | None, *, random_init: bool = False,
                    size: int = 299) -> InceptionFeatures:
    """pytorch-fid's FID Inception with weights from a local file (``random_init=True``: untrained,
    for tests of the metric plumbing only)."""
    try:
        from pytorch_fid import inception as fid_inception
    except ImportError as e:
        raise ImportError("FID/IS need pytorch-fid: pip install pytorch-fid") from e
    if weights is None and not random_init:
        raise ValueError(WEIGHTS_HELP)

    def local_state_dict(url, *args, **kwargs):
        if random_init:
            return None
        from vqfast.checkpoint import load_state_dict

        return load_state_dict(weights)

    built = {}

    def load(self_state, state):  # nn.Module.load_state_dict, skipped for random init
        return None if state is None else built["load"](self_state, state)

    built["load"] = nn.Module.load_state_dict
    with mock.patch.object(fid_inception, "load_state_dict_from_url", local_state_dict), \
            mock.patch.object(nn.Module, "load_state_dict", load):
        net = fid_inception.fid_inception_v3()
    return InceptionFeatures(net, size)


def inception_or_none(weights: str | os.PathLike | None = None) -> tuple[InceptionFeatures | None, str]:
    """The network from ``weights`` or $VQFAST_INCEPTION_WEIGHTS, or (None, what to provide)."""
    path = weights or os.environ.get(WEIGHTS_ENV)
    if not path:
        return None, WEIGHTS_HELP
    if not os.path.isfile(path):
        return None, f"Inception weights file not found: {path}. {WEIGHTS_HELP}"
    return build_inception(path), ""


@torch.no_grad()
def features(net: InceptionFeatures, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = zip(*(net(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)))
    return torch.cat(feats), torch.cat(logits)


def gaussian_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = feats.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (pytorch-fid's formula, float64)."""
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b)))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """torchmetrics' Inception Score (mean, std over ``splits``) from precomputed logits."""
    from torchmetrics.image.inception import InceptionScore

    class _Logits(nn.Module):  # hands torchmetrics the logits already computed
        def forward(self, idx):
            return logits[idx.long().flatten()]

    metric = InceptionScore(feature=_Logits(), splits=min(splits, logits.shape[0]))
    metric.update(torch.arange(logits.shape[0]))
    mean, std = metric.compute()
    return float(mean), float(std)


def fid_and_is(real: torch.Tensor, fake: torch.Tensor, net: InceptionFeatures) -> dict:
    """FID between real and generated/reconstructed images ([0, 1], (B, 3, H, W)) and IS of the fakes."""
    fr, _ = features(net, real)
    ff, logits = features(net, fake)
    mean, std = inception_score(logits)
    return {"fid": frechet_distance(fr, ff), "inception_score": mean, "inception_score_std": std}
