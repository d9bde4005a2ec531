"""``VQGAN``: the taming-transformers image tokenizer (Esser et al. 2021, "Taming Transformers for
High-Resolution Image Synthesis"), with taming's config names and state_dict layout.

Encoder: ``conv_in``, then per level of ``ch_mult`` ``num_res_blocks`` ResnetBlocks (with an
attention block after each where the feature map's side is in ``attn_resolutions``) and a stride-2
downsample (all levels but the last); a middle ResnetBlock / attention / ResnetBlock; GroupNorm,
swish, ``conv_out`` to ``z_channels`` (twice that with ``double_z``). ``quant_conv`` (1x1) maps to
the codebook dimension ``embed_dim``, the quantizer picks codes, ``post_quant_conv`` maps back and
the Decoder mirrors the encoder (``num_res_blocks + 1`` blocks per level, nearest x2 upsampling).

The quantizer is a vqfast layer (``quantizer=``):

* ``"taming"``: :class:`vqfast.compat.taming.VectorQuantizer2`, a codebook learned by its
  gradient; with ``codebook_l2_norm=True`` the codes and the encoder outputs are l2-normalized
  before the search (LlamaGen's tokenizer, usually with a low-dimensional code space, e.g.
  ``embed_dim=8``), :class:`L2NormVectorQuantizer`;
* ``"ema"``: :class:`vqfast.compat.taming.EMAVectorQuantizer`, codebook moved by EMA;
* ``"cosine"``: :class:`vqfast.nn.VectorQuantize` with ``use_cosine_sim=True`` (EMA codebook on
  the unit sphere, ViT-VQGAN style).

Fixes over taming, each able to reproduce taming where that matters:

* ``legacy``: taming's quantizer puts beta on the codebook term (``legacy=True``) and its
  ``VQModel`` never lets a config change that. Here ``legacy=None`` means the paper's placement
  (beta on the commitment term) for a new model; :meth:`VQGAN.from_taming` defaults to
  ``legacy=True``, as the checkpoint was trained.
* ``decode_code`` works (taming's calls a method its quantizer does not have).
* Mixed precision: the quantizer always runs in float32 with autocast off (under float16 the
  squared distances overflow and taming's training goes NaN); the losses in
  :mod:`vqfast.losses` do the same for their sensitive parts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.compat.taming import EMAVectorQuantizer, VectorQuantizer2
from vqfast.models.blocks import AttnBlock, Downsample, MidBlock, ResnetBlock, Upsample, group_norm, swish
from vqfast.nn import VectorQuantize
from vqfast.ops import quantize

QUANTIZERS = ("taming", "ema", "cosine")


def _check_arch(where: str, ch, ch_mult, num_res_blocks, resolution, z_channels, norm_groups) -> tuple[int, ...]:
    for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("resolution", resolution),
                        ("z_channels", z_channels), ("norm_groups", norm_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if isinstance(ch_mult, (str, bytes)) or not isinstance(ch_mult, Sequence) or len(ch_mult) == 0 \
            or not all(isinstance(m, int) and m >= 1 for m in ch_mult):
        raise ValueError(f"{where}: ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
    if resolution % 2 ** (len(ch_mult) - 1):
        raise ValueError(f"{where}: resolution={resolution} must be divisible by 2**(len(ch_mult)-1) = "
                         f"{2 ** (len(ch_mult) - 1)}")
    return tuple(ch_mult)


def _resolution_level(block_in: int, block_out: int, num_blocks: int, attention: bool, dropout: float,
                      norm_groups: int) -> nn.Module:
    """One level of encoder or decoder, taming's ``down[i]`` / ``up[i]`` without its resampler:
    ``block`` (ResnetBlocks block_in -> block_out -> ...) and ``attn`` (one after each block where
    the level's resolution is in attn_resolutions, else empty)."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(block_in if i == 0 else block_out, block_out, dropout=dropout,
                                            norm_groups=norm_groups) for i in range(num_blocks))
    level.attn = nn.ModuleList(AttnBlock(block_out, norm_groups=norm_groups) for _ in range(num_blocks if attention else 0))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """taming's ``Encoder`` (``taming.modules.diffusionmodules.model.Encoder``), same keys."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resolution: int, in_channels: int = 3,
                 z_channels: int, double_z: bool = False, norm_groups: int = 32):
        super().__init__()
        ch_mult = _check_arch("Encoder", ch, ch_mult, num_res_blocks, resolution, z_channels, norm_groups)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + ch_mult
        curr_res = resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in = ch * mult
            down = _resolution_level(ch * in_ch_mult[level], block_in, num_res_blocks, curr_res in attn_resolutions,
                                     dropout, norm_groups)
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = MidBlock(block_in, dropout=dropout, norm_groups=norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            h = _run_level(down, h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """taming's ``Decoder``, same keys: ``up[i]`` is the level at resolution ``resolution / 2**i``,
    so the blocks run from ``up[-1]`` (lowest resolution) to ``up[0]``."""

    def __init__(self, *, ch: int, out_ch: int = 3, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, resolution: int, z_channels: int,
                 give_pre_end: bool = False, norm_groups: int = 32):
        super().__init__()
        ch_mult = _check_arch("Decoder", ch, ch_mult, num_res_blocks, resolution, z_channels, norm_groups)
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.give_pre_end = give_pre_end
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout=dropout, norm_groups=norm_groups)
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            up = _resolution_level(block_in, ch * ch_mult[level], num_res_blocks + 1, curr_res in attn_resolutions,
                                   dropout, norm_groups)
            block_in = ch * ch_mult[level]
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)  # taming's order: up[level]
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            h = _run_level(up, h)
            if level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        return self.conv_out(swish(self.norm_out(h)))


class L2NormVectorQuantizer(VectorQuantizer2):
    """``VectorQuantizer2`` on the unit sphere (LlamaGen's ``codebook_l2_norm=True``).

    The encoder output ``z`` and the codebook are l2-normalized along the code dimension before the
    search, the output is the normalized code, and the losses compare the normalized vectors:
    ``mean((sg(z_n) - e_n)^2)`` (codebook) and ``mean((z_n - sg(e_n))^2)`` (commitment), beta on
    the commitment term unless ``legacy``. The codebook's gradient flows through the
    normalization, as in LlamaGen. Same state_dict (``embedding.weight``, stored unnormalized).
    """

    def __init__(self, n_e, e_dim, beta, legacy=False):
        super().__init__(n_e, e_dim, beta, legacy=legacy)
        with torch.no_grad():  # LlamaGen's init: uniform(-1/K, 1/K), then normalized
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def normalized_codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        if z.ndim != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"expected z of shape (B, {self.e_dim}, H, W), got {tuple(z.shape)}")
        zn = F.normalize(z, dim=1).permute(0, 2, 3, 1)
        r = quantize(zn, self.normalized_codebook(), metric="l2", estimator="ste", backend=self.backend)
        if self.legacy:
            loss = r.commit_loss + self.beta * r.codebook_loss
        else:
            loss = self.beta * r.commit_loss + r.codebook_loss
        return r.z_q.permute(0, 3, 1, 2).contiguous(), loss, (None, None, r.indices.reshape(-1))

    def get_codebook_entry(self, indices, shape):
        z_q = F.embedding(indices, self.normalized_codebook())
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VQGAN(nn.Module):
    """taming-transformers' ``VQModel`` (encoder, quantizer, decoder; no loss inside: see
    :class:`vqfast.losses.VQGANLoss`).

    Config names are taming's ``ddconfig`` (``ch, ch_mult, num_res_blocks, attn_resolutions,
    dropout, resolution, in_channels, out_ch, z_channels, double_z``) plus ``n_embed, embed_dim``.
    Extra: ``quantizer`` ("taming", "ema", "cosine"), ``codebook_l2_norm`` (LlamaGen),
    ``legacy`` (None: beta on the commitment term; True: taming's placement, on the codebook term),
    ``beta`` (commitment weight), ``decay`` (EMA decay of "ema"/"cosine"), ``norm_groups``
    (GroupNorm groups, 32 in taming; smaller for tiny models).

    ``forward(x) -> (xrec, qloss, info)``, ``info = (perplexity, min_encodings, indices)`` as the
    quantizer returns it (indices flat, ``(B*h*w,)``).
    """

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0, resolution: int = 256,
                 in_channels: int = 3, out_ch: int = 3, z_channels: int = 256, double_z: bool = False,
                 n_embed: int = 1024, embed_dim: int = 256, quantizer: str = "taming", codebook_l2_norm: bool = False,
                 legacy: bool | None = None, beta: float = 0.25, decay: float = 0.99, norm_groups: int = 32):
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"VQGAN: quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        for name, value in (("n_embed", n_embed), ("embed_dim", embed_dim), ("in_channels", in_channels),
                            ("out_ch", out_ch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VQGAN: {name} must be a positive int, got {value!r}")
        if not isinstance(beta, (int, float)) or beta < 0:
            raise ValueError(f"VQGAN: beta must be a non-negative number, got {beta!r}")
        if legacy not in (None, True, False):
            raise ValueError(f"VQGAN: legacy must be None, True or False, got {legacy!r}")
        if quantizer != "taming" and legacy:
            raise NotImplementedError(f"VQGAN: legacy=True (beta on the codebook term) applies to "
                                      f"quantizer='taming' only; quantizer={quantizer!r} has no codebook loss term")
        if quantizer == "ema" and codebook_l2_norm:
            raise NotImplementedError("VQGAN: codebook_l2_norm=True with quantizer='ema'; use quantizer='cosine' "
                                      "(EMA codebook on the unit sphere) or quantizer='taming'")
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.config = dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, resolution=resolution,
                           in_channels=in_channels, out_ch=out_ch, z_channels=z_channels, double_z=double_z,
                           n_embed=n_embed, embed_dim=embed_dim, quantizer=quantizer,
                           codebook_l2_norm=codebook_l2_norm, legacy=legacy, beta=beta, decay=decay,
                           norm_groups=norm_groups)
        arch = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                    dropout=dropout, resolution=resolution, z_channels=z_channels, norm_groups=norm_groups)
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **arch)
        self.decoder = Decoder(out_ch=out_ch, **arch)
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.quantize = self._make_quantizer(quantizer, n_embed, embed_dim, beta, bool(legacy), codebook_l2_norm,
                                             decay)
        self.quant_conv = nn.Conv2d(2 * z_channels if double_z else z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @staticmethod
    def _make_quantizer(kind, n_embed, embed_dim, beta, legacy, l2_norm, decay) -> nn.Module:
        if kind == "taming":
            if l2_norm:
                return L2NormVectorQuantizer(n_embed, embed_dim, beta, legacy=legacy)
            return VectorQuantizer2(n_embed, embed_dim, beta, legacy=legacy)
        if kind == "ema":
            return EMAVectorQuantizer(n_embed, embed_dim, beta, decay=decay)
        return VectorQuantize(dim=embed_dim, codebook_size=n_embed, use_cosine_sim=True, decay=decay,
                              commitment_weight=beta, accept_image_fmap=True, rotation_trick=False)

    @classmethod
    def from_config(cls, config: dict) -> "VQGAN":
        """A new model from :attr:`config` (e.g. read back from a saved ``config.json``)."""
        return cls(**config)

    # -- the model -------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"VQGAN: x must be a float tensor (B, {self.in_channels}, H, W), got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VQGAN: x must be (B, {self.in_channels}, H, W) with H and W divisible by {f}, "
                             f"got shape {tuple(x.shape)}")

    def _quantize(self, h: torch.Tensor):
        # float32, autocast off: |z|^2 and the distances overflow float16, and bfloat16's 8-bit
        # mantissa picks the wrong code between close ones.
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            if isinstance(self.quantize, VectorQuantize):
                quant, indices, loss = self.quantize(h)
                return quant, loss.reshape(()), (None, None, indices.reshape(-1))
            return self.quantize(h)

    def encode(self, x: torch.Tensor):
        """``(quant, qloss, info)`` as taming's ``VQModel.encode``; ``quant`` is float32."""
        self._check_input(x)
        h = self.quant_conv(self.encoder(x))
        return self._quantize(h)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, H/f, W/f)`` of images ``x`` (``f = 2**(len(ch_mult)-1)``)."""
        quant, _, info = self.encode(x)
        return info[2].reshape(quant.shape[0], quant.shape[2], quant.shape[3])

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def codebook_vectors(self) -> torch.Tensor:
        """The (n_embed, embed_dim) codes the decoder sees (normalized where the search is)."""
        q = self.quantize
        if isinstance(q, VectorQuantize):
            return q.codebook
        if isinstance(q, L2NormVectorQuantizer):
            return q.normalized_codebook()
        return q.embedding.weight

    def decode_code(self, code_b: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Images from code indices: ``code_b`` of shape (B, h, w), or flat with ``shape`` (B, h, w)
        or taming's (B, h, w, embed_dim)."""
        if not isinstance(code_b, torch.Tensor) or code_b.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"VQGAN.decode_code: code_b must be an int64/int32 tensor of indices, got "
                            f"{code_b.dtype if isinstance(code_b, torch.Tensor) else type(code_b).__name__}")
        if shape is not None:
            code_b = code_b.reshape(tuple(shape)[:3])
        if code_b.ndim != 3:
            raise ValueError(f"VQGAN.decode_code: code_b must be (B, h, w) (or flat with shape=), "
                             f"got shape {tuple(code_b.shape)}")
        if code_b.numel() and (int(code_b.min()) < 0 or int(code_b.max()) >= self.n_embed):
            raise ValueError(f"VQGAN.decode_code: indices must lie in [0, {self.n_embed}), got "
                             f"[{int(code_b.min())}, {int(code_b.max())}]")
        quant = F.embedding(code_b.long(), self.codebook_vectors()).permute(0, 3, 1, 2)
        return self.decode(quant.contiguous())

    def forward(self, x: torch.Tensor):
        """``(xrec, qloss, info)``."""
        quant, qloss, info = self.encode(x)
        return self.decode(quant), qloss, info

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where :class:`vqfast.losses.VQGANLoss` balances its terms."""
        return self.decoder.conv_out.weight

    # -- loaders (vqfast.models.loaders) ----------------------------------------------------------

    @classmethod
    def from_taming(cls, ckpt_or_state_dict, config, *, legacy: bool | None = True, **overrides) -> "VQGAN":
        """A taming-transformers ``VQModel`` checkpoint; see :func:`vqfast.models.loaders.from_taming`."""
        from vqfast.models.loaders import from_taming
        return from_taming(ckpt_or_state_dict, config, legacy=legacy, **overrides)

    @classmethod
    def from_diffusers(cls, model_or_path, config=None, **overrides) -> "VQGAN":
        """A diffusers ``VQModel``; see :func:`vqfast.models.loaders.from_diffusers`."""
        from vqfast.models.loaders import from_diffusers
        return from_diffusers(model_or_path, config, **overrides)

    @classmethod
    def from_llamagen(cls, ckpt_or_state_dict, config=None, *, key: str | None = None, **overrides) -> "VQGAN":
        """A LlamaGen VQ tokenizer checkpoint; see :func:`vqfast.models.loaders.from_llamagen`."""
        from vqfast.models.loaders import from_llamagen
        return from_llamagen(ckpt_or_state_dict, config, key=key, **overrides)
