"""vqfast.patch: a model holding other packages' quantizers, patched in place, gives the same
outputs, losses, gradients and state as the original (a deep copy run side by side)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import vqfast
from tests.nn.compare import TOL


class Model(nn.Module):
    """encoder conv -> quantizer -> decoder conv, the shape of every VQ autoencoder."""

    def __init__(self, quantizer, channels, image_fmap=True):
        super().__init__()
        self.enc = nn.Conv2d(3, channels, 3, padding=1)
        self.quantize = quantizer
        self.dec = nn.Conv2d(channels, 3, 3, padding=1)
        self.image_fmap = image_fmap

    def forward(self, x):
        h = self.enc(x)
        if not self.image_fmap:  # sequence layers: (B, H*W, C)
            b, c, hh, ww = h.shape
            out = self.quantize(h.flatten(2).transpose(1, 2))
            q = out[0].transpose(1, 2).reshape(b, c, hh, ww)
        else:
            out = self.quantize(h)
            q = out[0]
        return self.dec(q), out[1:]


def _flat(outs):
    """Tensors in a nested output tuple, in order (None skipped)."""
    for o in outs:
        if isinstance(o, (tuple, list)):
            yield from _flat(o)
        elif isinstance(o, torch.Tensor):
            yield o


def run_pair(model, x, train, seed=0):
    ref = model
    ours = copy.deepcopy(model)
    report = vqfast.patch(ours)
    assert len(report.replaced) == 1 and not report.skipped, str(report)
    assert type(ours.quantize).__module__.startswith("vqfast.")
    for m in (ref, ours):
        m.train(train)
    outs = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)
        rec, extra = m(xi)
        loss = rec.square().mean() + sum(t.float().sum() for t in _flat(extra) if t.is_floating_point()
                                         and t.requires_grad)
        loss.backward()
        outs.append((rec, list(_flat(extra)), xi.grad, m))
    (rec_r, ex_r, g_r, _), (rec_o, ex_o, g_o, _) = outs
    torch.testing.assert_close(rec_o, rec_r, **TOL)
    assert len(ex_o) == len(ex_r)
    for a, b in zip(ex_o, ex_r):
        assert a.shape == b.shape
        if a.is_floating_point():
            torch.testing.assert_close(a, b.to(a.dtype), **TOL)
        else:
            assert torch.equal(a, b)
    torch.testing.assert_close(g_o, g_r, **TOL)
    sr, so = ref.state_dict(), ours.state_dict()
    assert set(sr) == set(so)
    for k in sr:
        torch.testing.assert_close(so[k].to(sr[k].dtype), sr[k], **TOL, msg=lambda m: f"{k}: {m}")
    for (name, p), (_, po) in zip(ref.named_parameters(), ours.named_parameters()):
        assert (p.grad is None) == (po.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(po.grad, p.grad, **TOL, msg=lambda m: f"grad {name}: {m}")
    return report


def taming():
    return pytest.importorskip("taming.modules.vqvae.quantize")


def vqp():
    return pytest.importorskip("vector_quantize_pytorch")


X = (2, 3, 6, 5)


def taming_vq2():
    """taming's VectorQuantizer2: the GitHub package has it; the PyPI release (installed here) only
    has the first VectorQuantizer. diffusers' VectorQuantizer is taming's VectorQuantizer2 code with
    the dimension renamed, so it stands in under taming's class name (the name is what patch reads)."""
    q = taming()
    if hasattr(q, "VectorQuantizer2"):
        return q.VectorQuantizer2
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")

    class VectorQuantizer2(vae.VectorQuantizer):
        @property
        def e_dim(self):
            return self.vq_embed_dim

    VectorQuantizer2.__module__ = "taming.modules.vqvae.quantize"
    VectorQuantizer2.__qualname__ = "VectorQuantizer2"
    return VectorQuantizer2


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", ["v1", "v2", "v2_sane_new"])
def test_taming(kind, train):
    q = taming()
    C = 8
    quant = {"v1": lambda: q.VectorQuantizer(32, C, 0.25),
             "v2": lambda: taming_vq2()(32, C, 0.25),
             "v2_sane_new": lambda: taming_vq2()(32, C, 0.25, sane_index_shape=True, legacy=False)}[kind]()
    with torch.no_grad():  # codes spread like the encoder's outputs, so the choice is not degenerate
        quant.embedding.weight.normal_()
    run_pair(Model(quant, C), torch.randn(X), train)


@pytest.mark.parametrize("train", [False, True])
def test_diffusers(train):
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    quant = vae.VectorQuantizer(32, 8, 0.25, sane_index_shape=True)
    with torch.no_grad():
        quant.embedding.weight.normal_()
    run_pair(Model(quant, 8), torch.randn(X), train)


def test_diffusers_vqmodel_whole():
    """A whole diffusers VQModel: patched, its encode/decode equal the original's."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                              layers_per_block=1, latent_channels=4, num_vq_embeddings=64, vq_embed_dim=4,
                              norm_num_groups=4, sample_size=8).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    ours = copy.deepcopy(model)
    report = vqfast.patch(ours)
    assert [r[0] for r in report.replaced] == ["quantize"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).sample, model(x).sample, **TOL)


VQ_CONFIGS = {
    "ema": dict(dim=8, codebook_size=32, decay=0.8),
    "cosine": dict(dim=8, codebook_size=32, use_cosine_sim=True),
    "heads": dict(dim=8, codebook_size=32, heads=2, separate_codebook_per_head=True, codebook_dim=4),
    "projection_layernorm": dict(dim=8, codebook_size=32, codebook_dim=4, layernorm_after_project_in=True,
                                 rotation_trick=False, commitment_weight=0.5),
    "learnable": dict(dim=8, codebook_size=32, learnable_codebook=True, ema_update=False),
    "dead_codes": dict(dim=8, codebook_size=32, threshold_ema_dead_code=2),
}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("config", list(VQ_CONFIGS))
def test_vector_quantize(config, train):
    quant = vqp().VectorQuantize(accept_image_fmap=True, **VQ_CONFIGS[config])
    run_pair(Model(quant, 8), torch.randn(X), train)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_residual(grouped, train):
    v = vqp()
    kw = dict(dim=8, num_quantizers=3, codebook_size=16, quantize_dropout=True, threshold_ema_dead_code=1)
    quant = v.GroupedResidualVQ(groups=2, **kw) if grouped else v.ResidualVQ(codebook_dim=4, **kw)
    run_pair(Model(quant, 8, image_fmap=False), torch.randn(X), train, seed=3)


def test_unsupported_is_reported_not_silent():
    quant = vqp().VectorQuantize(dim=8, codebook_size=16, directional_reparam=True, threshold_ema_dead_code=2)
    model = Model(quant, 8, image_fmap=False)
    with pytest.warns(UserWarning, match="directional_reparam"):
        report = vqfast.patch(model)
    assert model.quantize is quant
    assert report.skipped and "directional_reparam" in report.skipped[0][2] and not report.replaced
    with pytest.raises(NotImplementedError, match="quantize.*directional_reparam"):
        vqfast.patch(model, strict=True)


def test_nested_shared_and_report():
    """Quantizers deep in the tree are found; one module shared by two parents stays shared."""
    shared = taming_vq2()(16, 8, 0.25)
    model = nn.ModuleDict({"a": Model(shared, 8), "b": nn.Sequential(Model(shared, 8)), "plain": nn.Linear(2, 2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = vqfast.patch(model, backend="torch")
    assert [r[0] for r in report.replaced] == ["a.quantize"]
    assert model["a"].quantize is model["b"][0].quantize
    assert model["a"].quantize.backend == "torch"
    assert isinstance(model["plain"], nn.Linear)
    assert "a.quantize" in str(report)


def test_bad_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vqfast.patch("not a model")
