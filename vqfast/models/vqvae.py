"""``VQVAE``: the model of van den Oord et al. 2017, "Neural Discrete Representation Learning".

Encoder: ``log2(downsample)`` strided 4x4 convolutions (stride 2, ReLU), a 3x3 convolution, a
stack of residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv) and a 1x1 projection to the codebook
dimension. Decoder: the mirror image, a 3x3 convolution, the residual stack, then transposed 4x4
convolutions (stride 2). The paper's CIFAR-10 model is ``channels=256, num_res_blocks=2,
res_channels=256`` (its 1x1 residual branch is 256 wide too), ``downsample=4, codebook_size=512``.

The quantizer is any vqfast layer (see :func:`make_quantizer`): EMA or learnable codebook,
Euclidean or cosine search, one codebook or a residual stack. It is called on channel-last rows
``(B, H*W, D)`` so every layer sees the same layout, and indices come back as ``(B, h, w)`` (one
codebook) or ``(B, h, w, Q)`` (residual).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.nn import ResidualVQ, VectorQuantize

QUANTIZERS = ("ema", "learnable", "cosine", "residual")


def make_quantizer(kind: str, *, dim: int, codebook_size: int, num_quantizers: int = 1, decay: float = 0.99,
                   commitment_weight: float = 0.25, kmeans_init: bool = True, threshold_ema_dead_code: float = 2.0,
                   sync_codebook: bool | None = None) -> nn.Module:
    """A vqfast quantizer layer by name.

    ``ema``: the VQ-VAE paper's EMA codebook (Appendix A.1), dead codes restarted from the batch;
    ``learnable``: a codebook trained by its gradient (the paper's main formulation, codebook loss
    + commitment loss), straight-through estimator; ``cosine``: EMA codebook searched by cosine
    similarity on l2-normalised vectors (Yu et al. 2021, "ViT-VQGAN"); ``residual``:
    ``num_quantizers`` EMA stages, each quantizing the previous stages' residual (SoundStream).
    ``sync_codebook=None`` all-reduces the codebook statistics across processes when built inside
    an initialized process group (DDP), as vector-quantize-pytorch does.
    """
    if kind not in QUANTIZERS:
        raise ValueError(f"make_quantizer: kind must be one of {QUANTIZERS}, got {kind!r}")
    if not isinstance(codebook_size, int) or codebook_size < 2:
        raise ValueError(f"make_quantizer: codebook_size must be an int >= 2, got {codebook_size!r}")
    if not isinstance(num_quantizers, int) or num_quantizers < 1:
        raise ValueError(f"make_quantizer: num_quantizers must be an int >= 1, got {num_quantizers!r}")
    if num_quantizers > 1 and kind != "residual":
        raise ValueError(f"make_quantizer: num_quantizers={num_quantizers} needs kind='residual', got {kind!r}")
    common = dict(codebook_size=codebook_size, commitment_weight=commitment_weight, sync_codebook=sync_codebook)
    if kind == "learnable":
        # The paper's codebook loss ||sg(z) - e||^2 reaches the codes through the straight-through
        # output, as vector-quantize-pytorch's learnable_codebook does; k-means init and dead-code
        # restart are EMA-codebook tools, so they stay off here.
        return VectorQuantize(dim=dim, ema_update=False, learnable_codebook=True, rotation_trick=False, **common)
    ema = dict(decay=decay, kmeans_init=kmeans_init, threshold_ema_dead_code=threshold_ema_dead_code,
               rotation_trick=False, **common)
    if kind == "cosine":
        return VectorQuantize(dim=dim, use_cosine_sim=True, **ema)
    if kind == "residual":
        return ResidualVQ(dim=dim, num_quantizers=num_quantizers, **ema)
    return VectorQuantize(dim=dim, **ema)


class ResidualBlock(nn.Module):
    """ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input (the paper's residual block)."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(res_channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Sequential):
    def __init__(self, in_channels: int, channels: int, res_channels: int, num_res_blocks: int, downsample: int,
                 embed_dim: int):
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(int(math.log2(downsample))):
            # Half width before the last stride, as the paper's encoder (and DeepMind's Sonnet example).
            c_out = channels // 2 if i < int(math.log2(downsample)) - 1 else channels
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, channels, 3, padding=1))
        layers += [ResidualBlock(channels, res_channels) for _ in range(num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(channels, embed_dim, 1)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    def __init__(self, out_channels: int, channels: int, res_channels: int, num_res_blocks: int, downsample: int,
                 embed_dim: int):
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, channels, 3, padding=1)]
        layers += [ResidualBlock(channels, res_channels) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        n_up = int(math.log2(downsample))
        c_in = channels
        for i in range(n_up):
            last = i == n_up - 1
            c_out = out_channels if last else channels // 2
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            c_in = c_out
        super().__init__(*layers)


class VQVAE(nn.Module):
    """VQ-VAE (van den Oord et al. 2017) on a vqfast quantizer.

    ``forward(x)`` takes images ``(B, in_channels, H, W)`` in [-1, 1] with H and W multiples of
    ``downsample`` and returns ``(xrec, qloss, info)`` like taming's ``VQModel``: ``qloss`` is the
    quantizer's loss (commitment, and the codebook loss of a learnable codebook), ``info`` a dict
    with ``indices`` ``(B, h, w)`` or ``(B, h, w, Q)``. ``encode(x) -> (z_q, qloss, indices)``,
    ``decode(z_q)``, ``decode_code(indices)``. The constructor arguments are stored in ``config``
    so a checkpoint's JSON rebuilds the model (``VQVAE(**config)``).
    """

    def __init__(self, in_channels: int = 3, channels: int = 128, res_channels: int = 64, num_res_blocks: int = 2,
                 downsample: int = 4, codebook_size: int = 512, embed_dim: int = 64, quantizer: str = "ema",
                 num_quantizers: int = 1, decay: float = 0.99, commitment_weight: float = 0.25,
                 kmeans_init: bool = True, threshold_ema_dead_code: float = 2.0, sync_codebook: bool | None = None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels), ("res_channels", res_channels),
                            ("embed_dim", embed_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VQVAE: {name} must be an int >= 1, got {value!r}")
        if not isinstance(num_res_blocks, int) or num_res_blocks < 0:
            raise ValueError(f"VQVAE: num_res_blocks must be an int >= 0, got {num_res_blocks!r}")
        if not isinstance(downsample, int) or downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"VQVAE: downsample must be a power of two >= 2, got {downsample!r}")
        if channels < 2:
            raise ValueError(f"VQVAE: channels must be >= 2 (the first strided layers are channels // 2 wide), "
                             f"got {channels}")
        self.config = dict(in_channels=in_channels, channels=channels, res_channels=res_channels,
                           num_res_blocks=num_res_blocks, downsample=downsample, codebook_size=codebook_size,
                           embed_dim=embed_dim, quantizer=quantizer, num_quantizers=num_quantizers, decay=decay,
                           commitment_weight=commitment_weight, kmeans_init=kmeans_init,
                           threshold_ema_dead_code=threshold_ema_dead_code, sync_codebook=sync_codebook)
        self.in_channels = in_channels
        self.downsample = downsample
        self.codebook_size = codebook_size
        self.num_quantizers = num_quantizers if quantizer == "residual" else 1
        self.encoder = Encoder(in_channels, channels, res_channels, num_res_blocks, downsample, embed_dim)
        self.quantize = make_quantizer(quantizer, dim=embed_dim, codebook_size=codebook_size,
                                       num_quantizers=num_quantizers, decay=decay,
                                       commitment_weight=commitment_weight, kmeans_init=kmeans_init,
                                       threshold_ema_dead_code=threshold_ema_dead_code, sync_codebook=sync_codebook)
        self.decoder = Decoder(in_channels, channels, res_channels, num_res_blocks, downsample, embed_dim)

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"VQVAE: x must be a float tensor (B, {self.in_channels}, H, W), got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"VQVAE: x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.downsample or x.shape[-1] % self.downsample:
            raise ValueError(f"VQVAE: x's height and width must be multiples of downsample={self.downsample}, "
                             f"got {tuple(x.shape[-2:])}")

    def _quantize(self, z: torch.Tensor):
        b, d, h, w = z.shape
        rows = z.flatten(2).transpose(1, 2)                          # (B, h*w, D), channel-last
        q, indices, loss = self.quantize(rows)
        q = q.transpose(1, 2).reshape(b, d, h, w)
        indices = indices.reshape(b, h, w, *indices.shape[2:])
        return q, loss.sum(), indices                                # residual: one loss per stage

    def encode(self, x: torch.Tensor):
        """``(z_q (B, D, h, w), qloss, indices)``."""
        self._check_images(x)
        return self._quantize(self.encoder(x))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from code indices ``(B, h, w)`` (or ``(B, h, w, Q)`` for a residual quantizer)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError("VQVAE.decode_code: indices must be an int64/int32 tensor")
        want = 4 if self.num_quantizers > 1 else 3
        if indices.ndim != want or (want == 4 and indices.shape[-1] != self.num_quantizers):
            raise ValueError(f"VQVAE.decode_code: indices must have shape (B, h, w"
                             f"{', %d' % self.num_quantizers if want == 4 else ''}), got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"VQVAE.decode_code: indices must lie in [0, {self.codebook_size})")
        b, h, w = indices.shape[:3]
        rows = indices.long().reshape(b, h * w, *indices.shape[3:])
        q = self.quantize.get_output_from_indices(rows)              # (B, h*w, D)
        return self.decode(q.transpose(1, 2).reshape(b, -1, h, w))

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight: taming's adaptive GAN weight balances gradients there."""
        return self.decoder[-1].weight

    def forward(self, x: torch.Tensor):
        z_q, qloss, indices = self.encode(x)
        return self.decode(z_q), qloss, {"indices": indices}


def reconstruction_loss(x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
    """Mean squared error, the VQ-VAE paper's log-likelihood term up to a constant."""
    return F.mse_loss(xrec, x)
