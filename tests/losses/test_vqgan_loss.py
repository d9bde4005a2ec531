"""VQGANLoss, LPIPS and the PatchGAN discriminator: loss terms and the adaptive weight against a
float64 autograd reference, and equality with taming-transformers' modules (random weights: no
pretrained VGG can be downloaded here)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models.image_fixtures import images, one_thread  # noqa: F401 (one_thread: autouse)
from vqfast.checkpoint import save_state_dict
from vqfast.losses import LPIPS, NLayerDiscriminator, VQGANLoss




@pytest.fixture(scope="module")
def lpips():
    torch.manual_seed(0)
    lp = LPIPS()
    with torch.no_grad():  # LPIPS's linear weights are non-negative; random ones are fine otherwise
        for k in range(5):
            getattr(lp, f"lin{k}").model[-1].weight.uniform_(0, 0.1)
    return lp


@pytest.fixture(scope="module")
def taming_lpips_factory():
    """taming's LPIPS with random VGG weights (its constructor would download them)."""
    tl = pytest.importorskip("taming.modules.losses.lpips")
    from types import SimpleNamespace

    from torchvision.models.vgg import cfgs, make_layers

    mp = pytest.MonkeyPatch()
    # vgg16(pretrained=True) downloads: stand in torchvision's VGG16 layers on random weights
    # (without the classifier head LPIPS never reads)
    mp.setattr(tl, "models", SimpleNamespace(vgg16=lambda pretrained=False, **kw: SimpleNamespace(
        features=make_layers(cfgs["D"]))))
    mp.setattr(tl.LPIPS, "load_from_pretrained", lambda self, name="vgg_lpips": None)
    yield tl.LPIPS
    mp.undo()




# ---- discriminator -------------------------------------------------------------------------

@pytest.mark.parametrize("use_actnorm", [False, True])
def test_discriminator_matches_taming(use_actnorm):
    tmod = pytest.importorskip("taming.modules.discriminator.model")
    torch.manual_seed(1)
    ref = tmod.NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3, use_actnorm=use_actnorm).apply(tmod.weights_init)
    ours = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3, use_actnorm=use_actnorm)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = images(b=4, size=32, seed=2)
    torch.testing.assert_close(ours(x), ref(x))  # training mode: ActNorm initializes on this batch
    if use_actnorm:
        assert int(ours.main[3].initialized) == 1
        h = ours.main[:3](x)
        out = ours.main[3](h)  # initialized: zero mean, unit std per channel on that batch
        torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(16), atol=1e-4, rtol=0)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x.flip(0)), ref(x.flip(0)))


# ---- LPIPS ---------------------------------------------------------------------------------

def test_lpips_matches_taming(lpips, taming_lpips_factory):
    ref = taming_lpips_factory().eval()
    ref.load_state_dict(lpips.state_dict(), strict=True)  # same keys, both ways
    x, y = images(seed=3), images(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(lpips(x, y), ref(x, y), atol=1e-6, rtol=1e-5)
    assert lpips(x, y).shape == (2, 1, 1, 1) and torch.all(lpips(x, y) > 0)
    assert torch.all(lpips(x, x) == 0)


def test_lpips_weight_files(tmp_path, lpips):
    """lin-layer file (LPIPS v0.1 vgg.pth layout) + torchvision VGG16 file (features.<i>.*)."""
    sd = lpips.state_dict()
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    vgg = {}
    for k, v in sd.items():
        if k.startswith("net.slice"):
            vgg["features." + k.split(".", 2)[2]] = v
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's head, ignored
    torch.save(lin, tmp_path / "vgg.pth")
    save_state_dict(vgg, tmp_path / "vgg16.safetensors")
    loaded = LPIPS(tmp_path / "vgg.pth", tmp_path / "vgg16.safetensors")
    assert loaded.pretrained and not LPIPS().pretrained
    x, y = images(seed=5), images(seed=6)
    torch.testing.assert_close(loaded(x, y), lpips(x, y))
    full = LPIPS(sd)  # a full LPIPS state dict serves as both
    assert full.pretrained
    torch.testing.assert_close(full(x, y), lpips(x, y))
    with pytest.raises(ValueError, match="lpips_vgg_weights"):
        VQGANLoss(disc_start=0, lpips_weights=tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="lin0"):
        LPIPS(vgg)


def test_lpips_under_half_autocast_stays_finite_and_close(lpips):
    x, y = images(seed=7), images(seed=8)
    with torch.no_grad():
        full = lpips(x, y)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                half = lpips(x * 50, y * 50)  # large activations
                low = lpips(x, y)
            assert half.dtype == torch.float32 and torch.isfinite(half).all()
            torch.testing.assert_close(low, full, atol=0.05 * float(full.max()), rtol=0.05)


# ---- VQGANLoss against a float64 reference --------------------------------------------------

def _setup(dtype=torch.float64, seed=9):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 4, 16, 16, generator=g, dtype=dtype)
    last_layer = nn.Parameter(0.1 * torch.randn(3, 4, 3, 3, generator=g, dtype=dtype))
    x = images(seed=seed + 1, dtype=dtype)
    codebook_loss = torch.rand((), generator=g, dtype=dtype) + 0.1
    return feats, last_layer, x, codebook_loss


def _reference_generator_loss(x, xrec, codebook_loss, last_layer, disc, lp, *, pixel, pw, cw, dw, active):
    diff = x - xrec
    rec = diff.abs() if pixel == "l1" else diff ** 2
    nll = torch.mean(rec + pw * lp(x, xrec)) if lp is not None else torch.mean(rec)
    if not active:
        return nll + cw * codebook_loss, torch.zeros(())
    g = -torch.mean(disc(xrec))
    gn = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
    d_weight = (gn.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4).detach() * dw
    return nll + d_weight * g + cw * codebook_loss, d_weight


@pytest.mark.parametrize("pixel", ["l1", "l2"])
@pytest.mark.parametrize("step", [0, 5])
def test_generator_loss_and_adaptive_weight_float64(lpips, pixel, step):
    torch.manual_seed(10)
    loss_fn = VQGANLoss(disc_start=3, codebook_weight=0.7, pixel_loss=pixel, perceptual_weight=0.5,
                        disc_num_layers=2, disc_weight=0.8, perceptual_model=copy.deepcopy(lpips),
                        disc_ndf=8).double()
    feats, last_layer, x, cb = _setup()
    xrec = F.conv2d(feats, last_layer, padding=1)
    loss, log = loss_fn(cb, x, xrec, 0, step, last_layer=last_layer)
    grad = torch.autograd.grad(loss, last_layer, retain_graph=True)[0]
    active = step >= 3
    ref, d_weight = _reference_generator_loss(x, xrec, cb, last_layer, loss_fn.discriminator,
                                              loss_fn.perceptual_loss, pixel=pixel,
                                              pw=0.5, cw=0.7, dw=0.8, active=active)
    ref_grad = torch.autograd.grad(ref, last_layer)[0]
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(log["train/d_weight"], d_weight, atol=1e-12, rtol=1e-10)
    assert (float(log["train/d_weight"]) > 0) == active
    assert float(log["train/disc_factor"]) == (1.0 if active else 0.0)


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_discriminator_loss_float64(disc_loss):
    torch.manual_seed(11)
    loss_fn = VQGANLoss(disc_start=2, disc_loss=disc_loss, disc_num_layers=2, disc_ndf=8,
                        perceptual_weight=0.0).double()
    feats, last_layer, x, cb = _setup(seed=12)
    xrec = F.conv2d(feats, last_layer, padding=1)
    d_loss, log = loss_fn(cb, x, xrec, 1, 2)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(xrec.detach())
    if disc_loss == "hinge":
        ref = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    else:
        ref = 0.5 * (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    torch.testing.assert_close(d_loss, ref, atol=1e-12, rtol=1e-10)
    assert torch.autograd.grad(d_loss, loss_fn.discriminator.main[0].weight)[0].abs().sum() > 0
    d_before, _ = loss_fn(cb, x, xrec, 1, 1)  # before disc_start
    assert float(d_before.detach()) == 0.0


def test_matches_taming_vqlpips_with_discriminator(lpips, taming_lpips_factory, monkeypatch):
    vqp = pytest.importorskip("taming.modules.losses.vqperceptual")
    monkeypatch.setattr(vqp, "LPIPS", taming_lpips_factory)
    torch.manual_seed(13)
    ref = vqp.VQLPIPSWithDiscriminator(disc_start=0, codebook_weight=1.0, disc_num_layers=2, disc_ndf=8,
                                       disc_weight=0.5)
    ours = VQGANLoss(disc_start=0, disc_num_layers=2, disc_ndf=8, disc_weight=0.5, perceptual_model=LPIPS())
    ours.load_state_dict(ref.state_dict(), strict=True)  # taming's loss.* keys load unchanged
    feats, last_layer, x, cb = _setup(dtype=torch.float32, seed=14)
    xrec = F.conv2d(feats, last_layer, padding=1)
    for idx in (0, 1):
        a, log_a = ours(cb, x, xrec, idx, 4, last_layer=last_layer)
        b, log_b = ref(cb, x, xrec, idx, 4, last_layer=last_layer)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert set(log_a) == set(log_b)
        for k in log_a:
            torch.testing.assert_close(log_a[k].float(), log_b[k].float(), atol=1e-6, rtol=1e-5)


def test_no_lpips_weights_disables_perceptual_term_with_warning():
    with pytest.warns(UserWarning, match="perceptual term is DISABLED"):
        loss_fn = VQGANLoss(disc_start=10)
    assert loss_fn.perceptual_loss is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VQGANLoss(disc_start=10, perceptual_weight=0.0)
    feats, last_layer, x, cb = _setup(dtype=torch.float32, seed=15)
    xrec = F.conv2d(feats, last_layer, padding=1)
    loss, log = loss_fn(cb, x, xrec, 0, 0, last_layer=last_layer)
    torch.testing.assert_close(loss, (x - xrec).abs().mean() + cb)
    assert float(log["train/p_loss"]) == 0.0


def test_evaluation_without_graph_gives_zero_adaptive_weight():
    loss_fn = VQGANLoss(disc_start=0, disc_num_layers=2, disc_ndf=8, perceptual_weight=0.0).eval()
    feats, last_layer, x, cb = _setup(dtype=torch.float32, seed=16)
    with torch.no_grad():
        xrec = F.conv2d(feats, last_layer, padding=1)
        loss, log = loss_fn(cb, x, xrec, 0, 5, last_layer=last_layer, split="val")
    assert float(log["val/d_weight"]) == 0.0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, (x - xrec).abs().mean() + cb)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pixel_loss"):
        VQGANLoss(disc_start=0, pixel_loss="l3", perceptual_weight=0.0)
    with pytest.raises(ValueError, match="disc_loss"):
        VQGANLoss(disc_start=0, disc_loss="wgan", perceptual_weight=0.0)
    with pytest.raises(ValueError, match="disc_start"):
        VQGANLoss(disc_start=-1, perceptual_weight=0.0)
    loss_fn = VQGANLoss(disc_start=0, disc_num_layers=2, disc_ndf=8, perceptual_weight=0.0)
    x = images()
    xrec = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="optimizer_idx"):
        loss_fn(torch.tensor(0.0), x, xrec, 2, 0)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.tensor(0.0), x, xrec[:1], 0, 0)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn(torch.tensor(0.0), x, xrec * 2, 0, 0)
    with pytest.raises(NotImplementedError, match="cond"):
        loss_fn(torch.tensor(0.0), x, xrec, 0, 0, cond=x)
