"""VQGAN.from_taming / from_diffusers / from_llamagen: outputs equal the source implementation's on
the same input, from files (Lightning .ckpt, safetensors, save_pretrained directories) and dicts."""
from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models.image_fixtures import images, one_thread  # noqa: F401 (one_thread: autouse)
from vqfast.checkpoint import CheckpointError, save_state_dict
from vqfast.losses import VQGANLoss
from vqfast.models import VQGAN, taming_loss_state_dict
from vqfast.models.blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm, swish






# ---- taming-transformers --------------------------------------------------------------------

DD = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=16,
          in_channels=3, z_channels=8, double_z=False)
TAMING_CONFIG = {"model": {"target": "taming.models.vqgan.VQModel",
                           "params": {"embed_dim": 4, "n_embed": 32, "ddconfig": DD,
                                      "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}


def taming_vqmodel(seed=0):
    """taming's VQModel layout from its own modules (taming.models.vqgan needs pytorch_lightning)."""
    tm = pytest.importorskip("taming.modules.diffusionmodules.model")
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
    from taming.modules.vqvae.quantize import VectorQuantizer

    torch.manual_seed(seed)
    ref = nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.encoder, ref.decoder = tm.Encoder(**DD), tm.Decoder(**DD)
    ref.quantize = VectorQuantizer(32, 4, beta=0.25)
    ref.quant_conv, ref.post_quant_conv = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
    ref.loss = nn.Module()
    ref.loss.discriminator = NLayerDiscriminator(input_nc=3, n_layers=2, ndf=8).apply(weights_init)
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()
    return ref.eval()


def taming_outputs(ref, x):
    with torch.no_grad():
        zq, loss, (_, _, idx) = ref.quantize(ref.quant_conv(ref.encoder(x)))
        return ref.decoder(ref.post_quant_conv(zq)), loss, idx.reshape(-1)


def assert_same_outputs(model, ref_out, x):
    xrec_ref, loss_ref, idx_ref = ref_out
    with torch.no_grad():
        xrec, qloss, info = model.eval()(x)
    assert torch.equal(info[2], idx_ref)
    torch.testing.assert_close(qloss, loss_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(xrec, xrec_ref, atol=1e-5, rtol=1e-4)


def test_from_taming_lightning_ckpt(tmp_path):
    ref = taming_vqmodel()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": ref.state_dict(), "epoch": 3, "global_step": 1000}, path)
    model = VQGAN.from_taming(path, TAMING_CONFIG)
    assert model.quantize.legacy is True
    x = images(seed=1)
    assert_same_outputs(model, taming_outputs(ref, x), x)
    # the loss.* entries load into VQGANLoss
    loss = VQGANLoss(disc_start=0, disc_num_layers=2, disc_ndf=8, perceptual_weight=0.0)
    loss.load_state_dict(taming_loss_state_dict(path), strict=True)
    loss.eval()  # BatchNorm on its running statistics, as the reference
    with torch.no_grad():
        torch.testing.assert_close(loss.discriminator(x), ref.loss.discriminator(x))


def test_from_taming_safetensors_and_params_config(tmp_path):
    ref = taming_vqmodel(seed=2)
    path = tmp_path / "model.safetensors"
    save_state_dict(ref.state_dict(), path)
    model = VQGAN.from_taming(str(path), TAMING_CONFIG["model"]["params"])
    x = images(seed=3)
    assert_same_outputs(model, taming_outputs(ref, x), x)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_from_taming_refuses_unsafe_and_unsupported(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Payload()}, f)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        VQGAN.from_taming(bad, TAMING_CONFIG)
    sd = VQGAN(**{k: v for k, v in DD.items() if k != "out_ch"}, out_ch=3, n_embed=32, embed_dim=4).state_dict()
    with pytest.raises(NotImplementedError, match="Gumbel"):
        VQGAN.from_taming({**sd, "quantize.proj.weight": torch.zeros(1)}, TAMING_CONFIG)
    with pytest.raises(ValueError, match="n_embed"):
        VQGAN.from_taming(sd, {"ddconfig": DD})
    with pytest.raises(CheckpointError, match="shape"):
        VQGAN.from_taming(sd, {**TAMING_CONFIG["model"]["params"], "n_embed": 64})


def test_from_taming_ema_quantizer():
    model = VQGAN(**{k: v for k, v in DD.items()}, n_embed=32, embed_dim=4, quantizer="ema")
    cfg = {"model": {"target": "taming.models.vqgan.EMAVQ", "params": TAMING_CONFIG["model"]["params"]}}
    again = VQGAN.from_taming(model.state_dict(), cfg)
    assert again.config["quantizer"] == "ema"
    x = images(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x)[0], model.eval()(x)[0])


# ---- diffusers -------------------------------------------------------------------------------

DIFFUSERS_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, sample_size=16, num_vq_embeddings=32, norm_num_groups=8, vq_embed_dim=3)


def diffusers_vqmodel(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.VQModel(**DIFFUSERS_CONFIG).eval()
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()
    return ref


def diffusers_outputs(ref, x):
    with torch.no_grad():
        h = ref.encode(x).latents
        _, loss, (_, _, idx) = ref.quantize(h)
        return ref(x).sample, loss, idx.reshape(-1)


def test_from_diffusers_module():
    ref = diffusers_vqmodel()
    model = VQGAN.from_diffusers(ref)
    assert model.config["ch_mult"] == [1, 2] and model.config["norm_groups"] == 8
    x = images(seed=5)
    assert_same_outputs(model, diffusers_outputs(ref, x), x)


def test_from_diffusers_save_pretrained_dir_and_state_dict(tmp_path):
    ref = diffusers_vqmodel(seed=1)
    ref.save_pretrained(tmp_path / "vq")
    x = images(seed=6)
    out = diffusers_outputs(ref, x)
    assert_same_outputs(VQGAN.from_diffusers(tmp_path / "vq"), out, x)
    assert_same_outputs(VQGAN.from_diffusers(ref.state_dict(), dict(ref.config)), out, x)
    with pytest.raises(ValueError, match="config"):
        VQGAN.from_diffusers(ref.state_dict())
    with pytest.raises(NotImplementedError, match="norm_type"):
        VQGAN.from_diffusers(ref.state_dict(), {**ref.config, "norm_type": "spatial"})


# ---- LlamaGen --------------------------------------------------------------------------------
# LlamaGen cannot be installed here; this is its VQ tokenizer's module tree and forward pass as
# published in FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py (Encoder/Decoder
# with conv_blocks[i].res / .attn / .downsample|.upsample, mid = [res, attn, res], attention at the
# lowest resolution only, decoder conv_blocks in processing order; its ResnetBlock / AttnBlock /
# Up/Downsample have taming's parameter names, so vqfast's blocks stand in for them), written out
# independently of vqfast's key map. Its state_dict therefore has LlamaGen's exact key layout.

class _LlamaGenCoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, encoder, groups):
        super().__init__()
        L = len(ch_mult)
        self.encoder_side, self.num_res_blocks, self.L = encoder, num_res_blocks, L
        in_ch_mult = (1,) + tuple(ch_mult)
        if encoder:
            self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        else:
            block_in = ch * ch_mult[-1]
            self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
            self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, norm_groups=groups),
                                      AttnBlock(block_in, norm_groups=groups),
                                      ResnetBlock(block_in, block_in, norm_groups=groups)])
        self.conv_blocks = nn.ModuleList()
        levels = range(L) if encoder else reversed(range(L))
        for i_level in levels:
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            if encoder:
                block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + (0 if encoder else 1)):
                blk.res.append(ResnetBlock(block_in, block_out, norm_groups=groups))
                block_in = block_out
                if i_level == L - 1:
                    blk.attn.append(AttnBlock(block_in, norm_groups=groups))
            if encoder and i_level != L - 1:
                blk.downsample = Downsample(block_in)
            if not encoder and i_level != 0:
                blk.upsample = Upsample(block_in)
            self.conv_blocks.append(blk)
        if encoder:
            self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, norm_groups=groups),
                                      AttnBlock(block_in, norm_groups=groups),
                                      ResnetBlock(block_in, block_in, norm_groups=groups)])
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels if encoder else 3, 3, padding=1)

    def forward(self, h):
        h = self.conv_in(h)
        if not self.encoder_side:
            for m in self.mid:
                h = m(h)
        for i_level, blk in enumerate(self.conv_blocks):
            for i in range(len(blk.res)):
                h = blk.res[i](h)
                if len(blk.attn) > 0:
                    h = blk.attn[i](h)
            if i_level != self.L - 1:
                h = blk.downsample(h) if self.encoder_side else blk.upsample(h)
        if self.encoder_side:
            for m in self.mid:
                h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class LlamaGenVQModel(nn.Module):
    def __init__(self, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=32, embed_dim=8,
                 groups=32):
        super().__init__()
        self.encoder = _LlamaGenCoder(ch, ch_mult, num_res_blocks, z_channels, True, groups)
        self.decoder = _LlamaGenCoder(ch, ch_mult, num_res_blocks, z_channels, False, groups)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook_size, embed_dim)
        self.quantize.register_buffer("codebook_used", torch.zeros(65536))
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def forward(self, x, beta=0.25):
        h = self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1)
        z = F.normalize(h, dim=-1)
        e = F.normalize(self.quantize.embedding.weight, dim=-1)
        zf = z.reshape(-1, z.shape[-1])
        d = zf.square().sum(1, keepdim=True) + e.square().sum(1) - 2 * zf @ e.t()
        idx = d.argmin(1)
        zq = e[idx].view(z.shape)
        loss = (zq - z.detach()).square().mean() + beta * (zq.detach() - z).square().mean()
        zq = (z + (zq - z).detach()).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(zq)), loss, idx


def test_llamagen_key_layout_is_llamagens():
    keys = set(LlamaGenVQModel().state_dict())
    for k in ("encoder.conv_blocks.0.res.0.conv1.weight", "encoder.conv_blocks.0.downsample.conv.weight",
              "encoder.conv_blocks.1.attn.0.q.weight", "encoder.mid.1.proj_out.weight", "encoder.mid.2.norm2.bias",
              "decoder.conv_blocks.0.attn.1.k.weight", "decoder.conv_blocks.0.upsample.conv.weight",
              "decoder.conv_blocks.1.res.1.conv2.weight", "quantize.embedding.weight", "quantize.codebook_used"):
        assert k in keys, k


@pytest.mark.parametrize("key", [None, "ema"])
def test_from_llamagen_checkpoint(tmp_path, key):
    torch.manual_seed(3)
    ref = LlamaGenVQModel().eval()
    ema = LlamaGenVQModel().eval()
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": ref.state_dict(), "ema": ema.state_dict(), "steps": 10,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    model = VQGAN.from_llamagen(path, key=key, resolution=16)
    src = ema if key == "ema" else ref
    assert model.config["codebook_l2_norm"] and model.config["embed_dim"] == 8
    assert model.config["ch_mult"] == [1, 2] and model.config["ch"] == 32
    x = images(seed=7)
    with torch.no_grad():
        xrec_ref, loss_ref, idx_ref = src(x)
        xrec, qloss, info = model.eval()(x)
    assert torch.equal(info[2], idx_ref)
    torch.testing.assert_close(qloss, loss_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(xrec, xrec_ref, atol=1e-5, rtol=1e-4)


def test_from_llamagen_explicit_config_and_errors():
    ref = LlamaGenVQModel()
    cfg = dict(codebook_size=32, codebook_embed_dim=8, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
               z_channels=8, ch=32, num_res_blocks=1)
    VQGAN.from_llamagen(ref.state_dict(), cfg)
    with pytest.raises(NotImplementedError, match="entropy_loss_ratio"):
        VQGAN.from_llamagen(ref.state_dict(), {**cfg, "entropy_loss_ratio": 0.1})
    with pytest.raises(CheckpointError, match="shape"):
        VQGAN.from_llamagen(ref.state_dict(), {**cfg, "codebook_size": 64})
    with pytest.raises(ValueError, match="LlamaGen"):
        VQGAN.from_llamagen({"foo": torch.zeros(1)})
