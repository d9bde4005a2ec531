"""Load other implementations' VQGAN checkpoints into :class:`vqfast.models.VQGAN`.

Each loader translates a config into VQGAN's arguments and renames the state_dict keys into
taming's layout (VQGAN's own); the weights are read through :func:`vqfast.checkpoint.load_state_dict`
(safetensors, or ``torch.load(weights_only=True)``: never arbitrary unpickling) and copied with
:func:`vqfast.checkpoint.load_into`, which checks every key and shape first.

* taming-transformers ``VQModel`` / ``EMAVQ`` (Lightning ``.ckpt``, weights under ``state_dict``):
  keys are already VQGAN's; the ``loss.*`` entries (LPIPS, discriminator) are left out here and
  load into :class:`vqfast.losses.VQGANLoss` through :func:`taming_loss_state_dict`.
* diffusers ``VQModel``: ``down_blocks[i].resnets[j]`` -> ``down[i].block[j]``; its
  ``up_blocks`` run in processing order (lowest resolution first), the reverse of taming's ``up``;
  attention projections are Linear layers (reshaped to 1x1 convs); ``conv_shortcut`` ->
  ``nin_shortcut``; ``conv_norm_out`` -> ``norm_out``.
* LlamaGen VQ tokenizer (``tokenizer/tokenizer_image/vq_model.py``; weights under ``model`` or
  ``ema``): ``conv_blocks[i].res/attn/downsample``, ``mid.0/1/2``; decoder ``conv_blocks`` in
  processing order; attention only at the lowest resolution; l2-normalized codes.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from vqfast.checkpoint import load_into, load_state_dict
from vqfast.models.vqgan import VQGAN

__all__ = ["from_taming", "from_diffusers", "from_llamagen", "taming_loss_state_dict",
           "taming_config_to_vqgan", "diffusers_config_to_vqgan", "llamagen_config_to_vqgan"]

_DDCONFIG_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resolution", "in_channels",
                  "out_ch", "z_channels", "double_z")


def _plain(obj):
    """Nested Mapping (dict, OmegaConf DictConfig) / sequence -> plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    return obj


def _rename(sd: Mapping[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to each key; a rule whose replacement is
    None drops the key. A replacement may be a function of the match."""
    out = {}
    for name, value in sd.items():
        for pattern, repl in rules:
            m = re.fullmatch(pattern, name)
            if m is None:
                continue
            if repl is None:
                name = None
            else:
                name = repl(m) if callable(repl) else m.expand(repl)
            break
        if name is not None:
            out[name] = value
    return out


# ---- taming-transformers ---------------------------------------------------------------------

def taming_config_to_vqgan(config) -> dict:
    """VQGAN kwargs from a taming config: the whole YAML (``model: {target, params}``), its
    ``params`` (``embed_dim, n_embed, ddconfig, lossconfig``) or a flat dict of the same names."""
    cfg = _plain(config)
    if not isinstance(cfg, dict):
        raise TypeError(f"from_taming: config must be a mapping (taming's YAML as a dict), got {type(config).__name__}")
    target = ""
    if "model" in cfg and isinstance(cfg["model"], dict):
        target = str(cfg["model"].get("target", ""))
        cfg = cfg["model"].get("params", cfg["model"])
    if "Gumbel" in target:
        raise NotImplementedError(f"from_taming: {target} (Gumbel quantizer) is not supported")
    dd = dict(cfg.get("ddconfig", cfg))
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "resolution", "z_channels") if k not in dd]
    for k in ("n_embed", "embed_dim"):
        if k not in cfg:
            missing.append(k)
    if missing:
        raise ValueError(f"from_taming: config lacks {missing} (give taming's model config: "
                         f"{{'embed_dim', 'n_embed', 'ddconfig': {{'ch', 'ch_mult', ...}}}})")
    if not dd.get("resamp_with_conv", True):
        raise NotImplementedError("from_taming: ddconfig resamp_with_conv=False is not supported")
    if dd.get("give_pre_end", False):
        raise NotImplementedError("from_taming: ddconfig give_pre_end=True is not supported")
    if cfg.get("remap") is not None:
        raise NotImplementedError("from_taming: remap is not supported by VQGAN")
    kwargs = {k: dd[k] for k in _DDCONFIG_KEYS if k in dd}
    kwargs.setdefault("attn_resolutions", [])
    kwargs["n_embed"], kwargs["embed_dim"] = int(cfg["n_embed"]), int(cfg["embed_dim"])
    if "EMA" in target:
        kwargs["quantizer"] = "ema"
    return kwargs


def taming_loss_state_dict(ckpt_or_state_dict) -> dict[str, torch.Tensor]:
    """The ``loss.*`` entries of a taming checkpoint, prefix removed: they load into
    :class:`vqfast.losses.VQGANLoss` (``discriminator.*``, ``perceptual_loss.*``)."""
    sd = load_state_dict(ckpt_or_state_dict)
    return {k[len("loss."):]: v for k, v in sd.items() if k.startswith("loss.")}


def from_taming(ckpt_or_state_dict, config, *, legacy: bool | None = True, **overrides) -> VQGAN:
    """A :class:`VQGAN` holding a taming-transformers ``VQModel`` (or ``EMAVQ``) checkpoint.

    ckpt_or_state_dict: a ``.ckpt``/``.pt`` (weights-only pickle; Lightning's ``state_dict`` entry
    is unwrapped), a ``.safetensors`` file, or a state dict. config: taming's model config (see
    :func:`taming_config_to_vqgan`). legacy: True by default, taming's beta placement, as the
    checkpoint was trained. overrides: further VQGAN arguments (e.g. ``norm_groups``).
    """
    kwargs = taming_config_to_vqgan(config)
    sd = load_state_dict(ckpt_or_state_dict)
    if "quantize.embed.weight" in sd or "quantize.proj.weight" in sd:
        raise NotImplementedError("from_taming: checkpoint holds a Gumbel quantizer (quantize.proj / quantize.embed), "
                                  "which VQGAN does not support")
    if "quantize.used" in sd:
        raise NotImplementedError("from_taming: checkpoint uses remap (quantize.used), not supported by VQGAN")
    if "quantize.embedding.cluster_size" in sd:
        kwargs["quantizer"] = "ema"
    if kwargs.get("quantizer") == "ema":
        legacy = None  # the EMA quantizer has no codebook loss term for beta to sit on
    kwargs.update(overrides)
    model = VQGAN(legacy=legacy, **kwargs)
    load_into(model, {k: v for k, v in sd.items() if not k.startswith("loss.")})
    return model


# ---- diffusers -------------------------------------------------------------------------------

def diffusers_config_to_vqgan(config) -> dict:
    """VQGAN kwargs from a diffusers ``VQModel`` config (``VQModel.config`` or its ``config.json``)."""
    cfg = _plain(config)
    if not isinstance(cfg, dict):
        raise TypeError(f"from_diffusers: config must be a mapping, got {type(config).__name__}")
    get = lambda k, default: cfg.get(k, default) if cfg.get(k) is not None else default  # noqa: E731
    boc = [int(c) for c in get("block_out_channels", [64])]
    ch = boc[0]
    if any(c % ch for c in boc):
        raise NotImplementedError(f"from_diffusers: block_out_channels={boc} are not multiples of the first")
    unsupported = {"act_fn": ("silu", "swish"), "norm_type": ("group",), "mid_block_add_attention": (True,)}
    for name, allowed in unsupported.items():
        if name in cfg and cfg[name] not in allowed:
            raise NotImplementedError(f"from_diffusers: {name}={cfg[name]!r} is not supported (only {allowed[0]!r})")
    for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in get(name, [allowed]) if t != allowed]
        if bad:
            raise NotImplementedError(f"from_diffusers: {name} {bad} are not supported (only {allowed!r})")
    latent = int(get("latent_channels", 3))
    return dict(ch=ch, ch_mult=[c // ch for c in boc], num_res_blocks=int(get("layers_per_block", 1)),
                attn_resolutions=[], dropout=0.0, resolution=int(get("sample_size", 32)),
                in_channels=int(get("in_channels", 3)), out_ch=int(get("out_channels", 3)), z_channels=latent,
                double_z=False, n_embed=int(get("num_vq_embeddings", 256)),
                embed_dim=int(get("vq_embed_dim", latent)), norm_groups=int(get("norm_num_groups", 32)))


_DIFFUSERS_RESNET = r"norm1|conv1|norm2|conv2|conv_shortcut"
_DIFFUSERS_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                   "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # new and pre-0.15 names


def _diffusers_rules(num_levels: int):
    def resnet(prefix):
        return lambda m: f"{prefix(m)}.{'nin_shortcut' if m['layer'] == 'conv_shortcut' else m['layer']}.{m['p']}"

    def attn(m):
        return f"{m['part']}.mid.attn_1.{_DIFFUSERS_ATTN[m['layer']]}.{m['p']}"

    up = lambda m: f"decoder.up.{num_levels - 1 - int(m['i'])}"  # noqa: E731
    return [
        (rf"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<j>[01])\.(?P<layer>{_DIFFUSERS_RESNET})\.(?P<p>\w+)",
         resnet(lambda m: f"{m['part']}.mid.block_{int(m['j']) + 1}")),
        (r"(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<layer>group_norm|to_q|to_k|to_v|to_out\.0|query|key|"
         r"value|proj_attn)\.(?P<p>\w+)", attn),
        (rf"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<layer>{_DIFFUSERS_RESNET})\.(?P<p>\w+)",
         resnet(lambda m: f"encoder.down.{m['i']}.block.{m['j']}")),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", r"encoder.down.\1.downsample.conv.\2"),
        (rf"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<layer>{_DIFFUSERS_RESNET})\.(?P<p>\w+)",
         resnet(lambda m: f"{up(m)}.block.{m['j']}")),
        (r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv\.(?P<p>\w+)", lambda m: f"{up(m)}.upsample.conv.{m['p']}"),
        (r"(encoder|decoder)\.conv_norm_out\.(\w+)", r"\1.norm_out.\2"),
    ]


def _read_diffusers_dir(path: Path):
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"from_diffusers: {path} has no config.json (expected a diffusers VQModel directory, "
                         f"as save_pretrained writes it)")
    config = json.loads(config_file.read_text())
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name, config
    raise ValueError(f"from_diffusers: {path} holds no diffusion_pytorch_model.safetensors / .bin")


def from_diffusers(model_or_path, config=None, **overrides) -> VQGAN:
    """A :class:`VQGAN` holding a diffusers ``VQModel``'s weights.

    model_or_path: a ``diffusers.VQModel`` instance, a directory written by its
    ``save_pretrained`` (``config.json`` + ``diffusion_pytorch_model.safetensors``), or a weights
    file / state dict together with ``config`` (the model's config dict). diffusers' quantizer
    keeps taming's beta placement, so the model is built with ``legacy=True``.
    """
    if isinstance(model_or_path, torch.nn.Module):
        config = dict(model_or_path.config) if config is None else config
        source = model_or_path.state_dict()
    elif isinstance(model_or_path, (str, os.PathLike)) and Path(model_or_path).is_dir():
        source, dir_config = _read_diffusers_dir(Path(model_or_path))
        config = dir_config if config is None else config
    else:
        source = model_or_path
    if config is None:
        raise ValueError("from_diffusers: config is required with a weights file or state dict "
                         "(the VQModel's config dict)")
    kwargs = diffusers_config_to_vqgan(config)
    kwargs.update(overrides)
    kwargs.setdefault("legacy", True)
    sd = load_state_dict(source)
    sd = _rename(sd, _diffusers_rules(len(kwargs["ch_mult"])))
    model = VQGAN(**kwargs)
    expected = model.state_dict()
    for name, value in list(sd.items()):  # Linear (C, C) attention projections -> 1x1 conv (C, C, 1, 1)
        if name in expected and value.ndim == 2 and expected[name].ndim == 4:
            sd[name] = value[:, :, None, None]
    load_into(model, sd)
    return model


# ---- LlamaGen --------------------------------------------------------------------------------

# LlamaGen's ModelArgs defaults (VQ-16); ch=128 and num_res_blocks=2 are fixed in its Encoder/Decoder.
LLAMAGEN_DEFAULTS = dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, commit_loss_beta=0.25,
                         entropy_loss_ratio=0.0, encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4],
                         z_channels=256, dropout_p=0.0)


def _llamagen_infer(sd) -> dict:
    """LlamaGen ModelArgs read off the tensor shapes (all but codebook_l2_norm / beta)."""
    try:
        n_embed, embed_dim = sd["quantize.embedding.weight"].shape
        z_channels = sd["quant_conv.weight"].shape[1]
        ch = sd["encoder.conv_in.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"from_llamagen: not a LlamaGen VQModel state dict (no {err.args[0]})") from None
    levels = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight", k))})
    ch_mult = [sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in levels]
    blocks = {int(m[1]) for k in sd if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    return dict(codebook_size=n_embed, codebook_embed_dim=embed_dim, encoder_ch_mult=ch_mult, decoder_ch_mult=ch_mult,
                z_channels=z_channels, ch=ch, num_res_blocks=len(blocks))


def llamagen_config_to_vqgan(config, *, resolution: int = 256) -> dict:
    """VQGAN kwargs from LlamaGen's ``ModelArgs`` fields (plus optional ``ch``, ``num_res_blocks``).

    Attention sits at the lowest resolution only, whatever the image size, so ``attn_resolutions``
    is ``[resolution // 2**(levels-1)]`` for the nominal ``resolution``."""
    cfg = {**LLAMAGEN_DEFAULTS, "ch": 128, "num_res_blocks": 2, **_plain(config)}
    if float(cfg["entropy_loss_ratio"]) != 0.0:
        raise NotImplementedError(f"from_llamagen: entropy_loss_ratio={cfg['entropy_loss_ratio']} is not supported "
                                  f"(only 0.0; it shapes training, not the forward pass)")
    if list(cfg["encoder_ch_mult"]) != list(cfg["decoder_ch_mult"]):
        raise NotImplementedError(f"from_llamagen: encoder_ch_mult {cfg['encoder_ch_mult']} != decoder_ch_mult "
                                  f"{cfg['decoder_ch_mult']} is not supported")
    if cfg.get("norm_type", "group") != "group":
        raise NotImplementedError(f"from_llamagen: norm_type={cfg['norm_type']!r} is not supported (only 'group')")
    ch_mult = [int(m) for m in cfg["encoder_ch_mult"]]
    return dict(ch=int(cfg["ch"]), ch_mult=ch_mult, num_res_blocks=int(cfg["num_res_blocks"]),
                attn_resolutions=[resolution // 2 ** (len(ch_mult) - 1)], dropout=float(cfg["dropout_p"]),
                resolution=resolution, in_channels=3, out_ch=3, z_channels=int(cfg["z_channels"]), double_z=False,
                n_embed=int(cfg["codebook_size"]), embed_dim=int(cfg["codebook_embed_dim"]), quantizer="taming",
                codebook_l2_norm=bool(cfg["codebook_l2_norm"]), legacy=False, beta=float(cfg["commit_loss_beta"]))


def _llamagen_rules(num_levels: int):
    up = lambda m: f"decoder.up.{num_levels - 1 - int(m['i'])}"  # noqa: E731
    mid = {"0": "block_1", "1": "attn_1", "2": "block_2"}
    return [
        (r"quantize\.codebook_used", None),  # usage statistics of training, not a weight
        (r"encoder\.conv_blocks\.(\d+)\.res\.(.+)", r"encoder.down.\1.block.\2"),
        (r"encoder\.conv_blocks\.(\d+)\.(attn|downsample)\.(.+)", r"encoder.down.\1.\2.\3"),
        (r"decoder\.conv_blocks\.(?P<i>\d+)\.res\.(?P<rest>.+)", lambda m: f"{up(m)}.block.{m['rest']}"),
        (r"decoder\.conv_blocks\.(?P<i>\d+)\.(?P<kind>attn|upsample)\.(?P<rest>.+)",
         lambda m: f"{up(m)}.{m['kind']}.{m['rest']}"),
        (r"(?P<part>encoder|decoder)\.mid\.(?P<j>[012])\.(?P<rest>.+)",
         lambda m: f"{m['part']}.mid.{mid[m['j']]}.{m['rest']}"),
    ]


def from_llamagen(ckpt_or_state_dict, config=None, *, key: str | None = None, resolution: int = 256,
                  **overrides) -> VQGAN:
    """A :class:`VQGAN` holding a LlamaGen VQ tokenizer (``vq_ds16_c2i.pt`` and the like).

    ckpt_or_state_dict: the checkpoint file (``model``, else ``ema``, is unwrapped; pass
    ``key="ema"`` for the averaged weights) or a state dict. config: LlamaGen ``ModelArgs``
    fields; missing ones are read off the tensor shapes, and ``codebook_l2_norm`` defaults to
    LlamaGen's True. The quantizer keeps LlamaGen's loss (beta on the commitment term).
    """
    sd = load_state_dict(ckpt_or_state_dict, key=key)
    if any(k.endswith("running_mean") for k in sd):
        raise NotImplementedError("from_llamagen: checkpoint uses norm_type='batch', not supported (only 'group')")
    cfg = {**_llamagen_infer(sd), **_plain(config or {})}
    kwargs = llamagen_config_to_vqgan(cfg, resolution=resolution)
    kwargs.update(overrides)
    model = VQGAN(**kwargs)
    load_into(model, _rename(sd, _llamagen_rules(len(kwargs["ch_mult"]))))
    return model
