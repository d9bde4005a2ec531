"""The convolutional building blocks of the taming-transformers VQGAN encoder and decoder.

Module and parameter names are taming's (``norm1``, ``conv1``, ``nin_shortcut``, ``q``/``k``/``v``/
``proj_out``, ``conv``), so taming checkpoints load without renaming; diffusers' and LlamaGen's
layouts are mapped onto these in ``vqfast.models.loaders``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """taming's ``Normalize``: GroupNorm with eps 1e-6 (32 groups unless a model asks for fewer)."""
    if channels % groups:
        raise ValueError(f"GroupNorm needs channels divisible by norm_groups: {channels} channels, "
                         f"norm_groups={groups} (set ch / ch_mult or norm_groups accordingly)")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3 -> norm -> swish -> dropout -> conv3x3, plus a 1x1 (or 3x3 with
    ``conv_shortcut``) projection of the input when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *, dropout: float = 0.0,
                 conv_shortcut: bool = False, norm_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections, residual."""

    def __init__(self, channels: int, *, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        # softmax(q k^T / sqrt(c)) v as taming computes it; the fused kernel never forms the
        # (HW x HW) matrix in memory where a flash/efficient kernel is available.
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric zero padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class MidBlock(nn.Module):
    """The bottleneck of encoder and decoder: ResnetBlock, attention, ResnetBlock (taming's
    ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``)."""

    def __init__(self, channels: int, *, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups=norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, norm_groups=norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))
