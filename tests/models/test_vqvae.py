"""VQVAE: shapes, the code round trip (decode_code(indices) == decode(z_q)), the nearest-code
contract of its indices, gradients, and input checks, for every quantizer kind."""
import pytest
import torch

from vqfast.models.vqvae import QUANTIZERS, VQVAE, make_quantizer


def tiny(quantizer="ema", downsample=4, **kw):
    cfg = dict(in_channels=3, channels=16, res_channels=8, num_res_blocks=1, downsample=downsample,
               codebook_size=32, embed_dim=8, quantizer=quantizer, num_quantizers=3 if quantizer == "residual" else 1)
    cfg.update(kw)
    return VQVAE(**cfg)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("downsample", [2, 4])
def test_shapes_and_code_round_trip(quantizer, downsample):
    model = tiny(quantizer, downsample)
    x = torch.rand(3, 3, 16, 24) * 2 - 1
    xrec, qloss, info = model(x)                      # training mode: EMA / k-means init run once
    assert xrec.shape == x.shape and qloss.ndim == 0 and torch.isfinite(qloss)
    h, w = 16 // downsample, 24 // downsample
    want = (3, h, w, 3) if quantizer == "residual" else (3, h, w)
    assert info["indices"].shape == want
    model.eval()
    with torch.no_grad():
        z_q, _, indices = model.encode(x)
        assert z_q.shape == (3, 8, h, w) and indices.shape == want
        assert int(indices.min()) >= 0 and int(indices.max()) < 32
        # The decoder sees exactly the codes the indices name: decoding the indices reproduces it.
        torch.testing.assert_close(model.decode_code(indices), model.decode(z_q), rtol=1e-5, atol=1e-5)
        xrec_eval, _, _ = model(x)
        torch.testing.assert_close(xrec_eval, model.decode(z_q))


@pytest.mark.parametrize("quantizer", ["ema", "learnable"])
def test_indices_name_the_nearest_code(quantizer):
    model = tiny(quantizer).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encoder(x).flatten(2).transpose(1, 2).reshape(-1, 8).double()
        _, _, indices = model.encode(x)
    codebook = model.quantize.codebook.double()
    d = torch.cdist(z, codebook) ** 2
    chosen = d.gather(1, indices.reshape(-1, 1))[:, 0]
    # Ties are possible, so compare the chosen code's float64 distance with the true minimum.
    torch.testing.assert_close(chosen, d.min(1).values, rtol=1e-4, atol=1e-5)


def test_cosine_quantizer_picks_the_most_similar_code():
    model = tiny("cosine").eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encoder(x).flatten(2).transpose(1, 2).reshape(-1, 8).double()
        _, _, indices = model.encode(x)
    sim = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(
        model.quantize.codebook.double(), dim=-1).T
    torch.testing.assert_close(sim.gather(1, indices.reshape(-1, 1))[:, 0], sim.max(1).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_gradients_reach_encoder_and_decoder(quantizer):
    model = tiny(quantizer)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    xrec, qloss, _ = model(x)
    (torch.nn.functional.mse_loss(xrec, x) + qloss).backward()
    for name in ("encoder.0.weight", "decoder.0.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    if quantizer == "learnable":
        assert model.quantize.codebook.requires_grad


def test_config_rebuilds_the_model():
    model = tiny("residual")
    clone = VQVAE(**model.config)
    clone.load_state_dict(model.state_dict())
    assert clone.config == model.config


def test_bad_input_raises_before_running():
    model = tiny()
    with pytest.raises(TypeError, match="x must be a float tensor"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\)"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of downsample=4"):
        model(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match="indices must lie in"):
        model.decode_code(torch.full((1, 2, 2), 32))
    with pytest.raises(ValueError, match="indices must have shape"):
        model.decode_code(torch.zeros(1, 2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="downsample must be a power of two"):
        tiny(downsample=3)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_quantizer("gumbel", dim=8, codebook_size=16)
    with pytest.raises(ValueError, match="needs kind='residual'"):
        make_quantizer("ema", dim=8, codebook_size=16, num_quantizers=2)
