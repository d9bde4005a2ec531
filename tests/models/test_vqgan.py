"""VQGAN: shapes and round trips for every quantizer, the beta placement (legacy), l2-normalized
codes, input checks, and training under autocast. (Equality with taming, diffusers and LlamaGen:
test_loaders.py.)"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from tests.models.image_fixtures import images, one_thread  # noqa: F401 (one_thread: autouse)
from vqfast.losses import VQGANLoss
from vqfast.models import VQGAN

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=8,
            n_embed=32, embed_dim=4)






@pytest.mark.parametrize("quantizer,l2", [("taming", False), ("taming", True), ("ema", False), ("cosine", False)])
def test_shapes_and_decode_code_round_trip(quantizer, l2):
    torch.manual_seed(0)
    model = VQGAN(**TINY, quantizer=quantizer, codebook_l2_norm=l2).eval()
    x = images(size=16)
    xrec, qloss, info = model(x)
    assert xrec.shape == x.shape and qloss.ndim == 0 and torch.isfinite(qloss)
    indices = info[2]
    assert indices.shape == (2 * 8 * 8,) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < TINY["n_embed"]
    codes = model.encode_indices(x)
    assert codes.shape == (2, 8, 8) and torch.equal(codes.reshape(-1), indices)
    torch.testing.assert_close(model.decode_code(codes), xrec, atol=1e-5, rtol=1e-5)
    # taming's calling convention: flat indices and the (B, h, w, C) shape
    torch.testing.assert_close(model.decode_code(indices, shape=(2, 8, 8, TINY["embed_dim"])), xrec,
                               atol=1e-5, rtol=1e-5)
    # the quantized latent is a codebook row at each position (normalized ones with l2 codes)
    quant, _, _ = model.encode(x)
    expect = model.codebook_vectors()[indices].reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(quant, expect, atol=1e-5, rtol=1e-5)


def test_non_square_input_and_three_levels():
    model = VQGAN(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(4,), resolution=16, z_channels=4,
                  n_embed=16, embed_dim=4).eval()
    x = torch.randn(1, 3, 16, 24)
    xrec, _, info = model(x)
    assert xrec.shape == x.shape and info[2].shape == (4 * 6,)
    assert len(model.encoder.down[2].attn) == 2 and len(model.decoder.up[2].attn) == 3  # attention at 4x4 only
    assert len(model.encoder.down[0].attn) == 0


def test_gradients_reach_every_trainable_part():
    torch.manual_seed(0)
    model = VQGAN(**TINY)
    xrec, qloss, _ = model(images())
    (xrec.square().mean() + qloss).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight",
                 "post_quant_conv.weight", "decoder.conv_out.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.get_last_layer() is model.decoder.conv_out.weight


def _codebook_grad_reference(model, x, weight):
    """d/de of weight * mean((sg(z) - e_idx)^2), in float64."""
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).double().permute(0, 2, 3, 1).reshape(-1, TINY["embed_dim"])
    e = model.quantize.embedding.weight.detach().double().requires_grad_(True)
    idx = torch.cdist(z, e.detach()).argmin(1)
    (weight * (z - e[idx]).square().mean()).backward()
    return e.grad


@pytest.mark.parametrize("legacy", [None, False, True])
def test_beta_placement(legacy):
    """legacy=None/False: beta on the commitment term (the paper); legacy=True: on the codebook term (taming)."""
    torch.manual_seed(1)
    beta = 0.25
    model = VQGAN(**TINY, legacy=legacy, beta=beta)
    with torch.no_grad():  # codes spread like the encoder outputs, so the search is unambiguous
        model.quantize.embedding.weight.normal_()
    x = images(seed=3)
    _, qloss, _ = model.encode(x)
    qloss.backward()
    ref = _codebook_grad_reference(model, x, beta if legacy else 1.0)
    torch.testing.assert_close(model.quantize.embedding.weight.grad.double(), ref, atol=1e-6, rtol=1e-4)


def test_from_taming_defaults_to_taming_beta_placement():
    cfg = dict(embed_dim=4, n_embed=32, ddconfig={k: v for k, v in TINY.items() if k not in ("n_embed", "embed_dim")})
    sd = VQGAN(**TINY).state_dict()
    assert VQGAN.from_taming(sd, cfg).quantize.legacy is True
    assert VQGAN.from_taming(sd, cfg, legacy=False).quantize.legacy is False


def test_l2_normalized_codes_match_a_float64_reference():
    """LlamaGen's quantizer: normalize z and codes, nearest code, losses on the normalized vectors."""
    torch.manual_seed(2)
    model = VQGAN(**{**TINY, "embed_dim": 8}, codebook_l2_norm=True, beta=0.25)
    x = images(seed=4)
    quant, qloss, info = model.encode(x)
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x)).double()
    zn = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    en = F.normalize(model.quantize.embedding.weight.detach().double(), dim=-1)
    d = torch.cdist(zn, en)
    chosen = d.gather(1, info[2][:, None]).squeeze(1)
    assert torch.all(chosen <= d.min(1).values + 1e-5)  # the chosen code is (one of) the nearest
    zq = en[info[2]]
    torch.testing.assert_close(quant.permute(0, 2, 3, 1).reshape(-1, 8).double(), zq, atol=1e-6, rtol=1e-5)
    assert torch.allclose(quant.norm(dim=1), torch.ones(()), atol=1e-5)
    expect = (1 + 0.25) * (zn - zq).square().mean()  # codebook + beta * commitment, equal in value
    torch.testing.assert_close(qloss.double(), expect, atol=1e-6, rtol=1e-5)


def test_bad_arguments_raise_before_running():
    with pytest.raises(ValueError, match="quantizer"):
        VQGAN(**TINY, quantizer="gumbel")
    with pytest.raises(ValueError, match="resolution"):
        VQGAN(**{**TINY, "resolution": 15})
    with pytest.raises(ValueError, match="ch_mult"):
        VQGAN(**{**TINY, "ch_mult": ()})
    with pytest.raises(ValueError, match="norm_groups"):
        VQGAN(**{**TINY, "ch": 16})  # 16 channels cannot make 32 GroupNorm groups
    VQGAN(**{**TINY, "ch": 16}, norm_groups=8)
    with pytest.raises(NotImplementedError, match="legacy"):
        VQGAN(**TINY, quantizer="ema", legacy=True)
    with pytest.raises(NotImplementedError, match="codebook_l2_norm"):
        VQGAN(**TINY, quantizer="ema", codebook_l2_norm=True)
    model = VQGAN(**TINY)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 15, 16))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(TypeError, match="x must be a float"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must lie"):
        model.decode_code(torch.full((1, 8, 8), 32))
    with pytest.raises(TypeError, match="code_b"):
        model.decode_code(torch.zeros(1, 8, 8))


def test_config_round_trip():
    model = VQGAN(**TINY, quantizer="ema", decay=0.9)
    again = VQGAN.from_config(model.config)
    assert again.config == model.config
    again.load_state_dict(model.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trains_under_autocast(dtype):
    """A few generator + discriminator steps with the GAN term and its adaptive weight on:
    everything stays finite, the quantizer runs in float32, and the reconstruction loss goes down.
    (LPIPS under autocast: tests/losses; half convolutions are slow on CPU, so it is left out here.)"""
    torch.manual_seed(7)
    model = VQGAN(**TINY)
    loss_fn = VQGANLoss(disc_start=0, disc_num_layers=2, disc_ndf=8, perceptual_weight=0.0)
    opt_g = torch.optim.Adam(model.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    x = images(b=2, seed=8)
    nll = []
    for step in range(4):
        with torch.autocast("cpu", dtype=dtype):
            xrec, qloss, _ = model(x)
            assert xrec.dtype == dtype and qloss.dtype == torch.float32
            loss, log = loss_fn(qloss, x, xrec, 0, step, last_layer=model.get_last_layer())
        opt_g.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt_g)
        with torch.autocast("cpu", dtype=dtype):
            d_loss, dlog = loss_fn(qloss, x, xrec.detach(), 1, step)
        opt_d.zero_grad()
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
        scaler.update()
        assert torch.isfinite(loss) and torch.isfinite(d_loss)
        assert all(torch.isfinite(v).all() for v in log.values()), log
        nll.append(float(log["train/nll_loss"]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert nll[-1] < nll[0]


@pytest.mark.parametrize("quantizer", ["taming", "ema"])
def test_quantizer_runs_in_float32_under_float16_autocast(quantizer):
    """Encoder outputs whose squared norms overflow float16 (|z|^2 > 65504) still get their
    nearest code: the search runs in float32 on the float16 activations."""
    torch.manual_seed(12)
    model = VQGAN(**TINY, quantizer=quantizer).eval()
    with torch.no_grad():
        model.quant_conv.weight.mul_(400.0)
        model.quantize.embedding.weight.normal_().mul_(150.0)
    x = images(seed=13)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        h = model.quant_conv(model.encoder(x))
        quant, qloss, info = model.encode(x)
    assert h.dtype == torch.float16 and torch.isfinite(h).all()
    rows = h.double().permute(0, 2, 3, 1).reshape(-1, TINY["embed_dim"])
    assert rows.square().sum(1).max() > 65504  # the case float16 distances cannot hold
    d = torch.cdist(rows, model.quantize.embedding.weight.double())
    chosen = d.gather(1, info[2][:, None]).squeeze(1)
    assert torch.all(chosen <= d.min(1).values * (1 + 1e-5) + 1e-3)
    assert quant.dtype == torch.float32 and torch.isfinite(qloss)
