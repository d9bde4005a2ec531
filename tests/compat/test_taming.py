"""vqfast.compat.taming against taming-transformers.

The PyPI release (taming-transformers 0.0.1, ``pip install --no-deps taming-transformers``)
ships only the first ``VectorQuantizer`` in ``taming.modules.vqvae.quantize``, whose math is
``VectorQuantizer2(legacy=True)``'s: the legacy path is compared with it (outputs, loss,
indices, gradients). ``VectorQuantizer2`` (legacy=False, sane_index_shape, remap) and
``EMAVectorQuantizer`` are compared with transcriptions of taming's GitHub code below (the
EMA one as its evident intent: the released class cannot be constructed); where the installed
taming has ``VectorQuantizer2``, it is used directly too.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqfast.compat.taming import EMAVectorQuantizer, VectorQuantizer2

B, C, H, W, K = 2, 8, 4, 5, 32
TOL = dict(rtol=1e-5, atol=1e-6)


# -- transcriptions of taming's GitHub code (first principles references) -----------------------

def ref_vq2(z, weight, beta, legacy, sane_index_shape):
    """taming VectorQuantizer2.forward (no remap)."""
    zp = z.permute(0, 2, 3, 1).contiguous()
    zf = zp.view(-1, weight.shape[1])
    d = zf.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * zf @ weight.t()
    idx = d.argmin(1)
    z_q = F.embedding(idx, weight).view(zp.shape)
    if legacy:
        loss = torch.mean((z_q.detach() - zp) ** 2) + beta * torch.mean((z_q - zp.detach()) ** 2)
    else:
        loss = beta * torch.mean((z_q.detach() - zp) ** 2) + torch.mean((z_q - zp.detach()) ** 2)
    z_q = zp + (z_q - zp).detach()
    z_q = z_q.permute(0, 3, 1, 2).contiguous()
    if sane_index_shape:
        idx = idx.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
    return z_q, loss, (None, None, idx)


def ref_ema(z, state, beta, decay, eps, training=True):
    """taming EMAVectorQuantizer.forward (evident intent); updates ``state`` (weight, cluster_size,
    embed_avg) in place."""
    weight, cluster_size, embed_avg = state
    k = weight.shape[0]
    zp = z.permute(0, 2, 3, 1)
    zf = zp.reshape(-1, weight.shape[1])
    d = zf.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * torch.einsum("bd,nd->bn", zf, weight)
    idx = d.argmin(1)
    z_q = F.embedding(idx, weight).view(zp.shape)
    enc = F.one_hot(idx, k).type(z.dtype)
    avg = enc.mean(0)
    perplexity = torch.exp(-torch.sum(avg * torch.log(avg + 1e-10)))
    if training:
        with torch.no_grad():
            cluster_size.mul_(decay).add_(enc.sum(0), alpha=1 - decay)
            embed_avg.mul_(decay).add_(enc.t() @ zf, alpha=1 - decay)
            n = cluster_size.sum()
            smoothed = (cluster_size + eps) / (n + k * eps) * n
            weight.copy_(embed_avg / smoothed.unsqueeze(1))
    loss = beta * F.mse_loss(z_q.detach(), zp)
    z_q = zp + (z_q - zp).detach()
    return z_q.permute(0, 3, 1, 2).contiguous(), loss, (perplexity, enc, idx)


def grads(fn, z, *params):
    zz = z.clone().requires_grad_()
    z_q, loss, info = fn(zz)
    g = torch.randn_like(z_q, generator=torch.Generator().manual_seed(1))
    ((z_q * g).sum() + loss).backward()
    return z_q.detach(), loss.detach(), info, zz.grad, [p.grad.clone() if p.grad is not None else None
                                                      for p in params]


# -- VectorQuantizer2 ------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane", [True, False])
def test_vq2_matches_taming_code(legacy, sane):
    ours = VectorQuantizer2(K, C, beta=0.25, legacy=legacy, sane_index_shape=sane)
    z = torch.randn(B, C, H, W) * 0.05
    w = ours.embedding.weight.detach().clone().requires_grad_()
    zr, lr, (pr, er, ir), gzr, (gwr,) = grads(lambda t: ref_vq2(t, w, 0.25, legacy, sane), z, w)
    zo, lo, (po, eo, io), gzo, (gwo,) = grads(ours, z, ours.embedding.weight)
    assert po is None and eo is None
    assert io.shape == ir.shape == ((B, H, W) if sane else (B * H * W,))
    assert torch.equal(io, ir)
    torch.testing.assert_close(zo, zr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    torch.testing.assert_close(gzo, gzr, **TOL)
    torch.testing.assert_close(gwo, gwr, **TOL)
    flat = io.reshape(-1)
    torch.testing.assert_close(ours.get_codebook_entry(flat, (B, H, W, C)), zr, **TOL)


def test_vq2_legacy_matches_installed_taming():
    tq = pytest.importorskip("taming.modules.vqvae.quantize")
    ref = getattr(tq, "VectorQuantizer2", None)
    ref = ref(K, C, 0.25) if ref is not None else tq.VectorQuantizer(K, C, 0.25)  # same math (legacy beta)
    ours = VectorQuantizer2(K, C, 0.25)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["embedding.weight"]
    z = torch.randn(B, C, H, W) * 0.05
    zr, lr, (_, _, ir), gzr, (gwr,) = grads(ref, z, ref.embedding.weight)
    zo, lo, (_, _, io), gzo, (gwo,) = grads(ours, z, ours.embedding.weight)
    assert torch.equal(io, ir.reshape(-1))
    torch.testing.assert_close(zo, zr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    torch.testing.assert_close(gzo, gzr, **TOL)
    torch.testing.assert_close(gwo, gwr, **TOL)
    torch.testing.assert_close(ours.get_codebook_entry(io, (B, H, W, C)), ref.get_codebook_entry(ir.reshape(-1),
                                                                                              (B, H, W, C)), **TOL)


def test_vq2_remap(tmp_path):
    used = np.array([3, 7, 11, 20])
    path = tmp_path / "used.npy"
    np.save(path, used)
    ours = VectorQuantizer2(K, C, 0.25, remap=str(path), unknown_index="extra", sane_index_shape=False)
    assert "used" in ours.state_dict() and ours.re_embed == 5
    # make the used codes far from everything except the inputs drawn at them
    z = ours.embedding.weight.detach()[torch.tensor([3, 7, 0, 20, 11, 5])].reshape(1, 2, 3, C).permute(0, 3, 1, 2)
    _, _, (_, _, idx) = ours(z)
    assert idx.shape == (6, 1)
    assert idx.reshape(-1).tolist() == [0, 1, 4, 3, 2, 4]  # positions in `used`, unknown -> "extra" (4)
    back = ours.get_codebook_entry(torch.tensor([0, 1, 2]), (1, 1, 3, C))         # (B, C, H, W)
    torch.testing.assert_close(back[0, :, 0].t(), ours.embedding.weight[torch.tensor([3, 7, 11])])


# -- EMAVectorQuantizer ----------------------------------------------------------------------------

def test_ema_state_dict_keys():
    ours = EMAVectorQuantizer(K, C, beta=0.25)
    assert list(ours.state_dict()) == ["embedding.weight", "embedding.cluster_size", "embedding.embed_avg"]
    assert all(not p.requires_grad for p in ours.parameters())
    assert float(ours.embedding.cluster_size.sum()) == 0.0
    torch.testing.assert_close(ours.embedding.embed_avg, ours.embedding.weight)


def test_ema_matches_taming_code():
    ours = EMAVectorQuantizer(K, C, beta=0.25, decay=0.9, eps=1e-5)
    state = [t.detach().clone() for t in ours.state_dict().values()]
    for step in range(3):
        z = torch.randn(B, C, H, W)
        zr, lr, (pr, er, ir), gzr, _ = grads(lambda t: ref_ema(t, state, 0.25, 0.9, 1e-5), z)
        zo, lo, (po, eo, io), gzo, _ = grads(ours, z)
        assert torch.equal(io, ir)
        assert torch.equal(eo, er)
        torch.testing.assert_close(zo, zr, **TOL)
        torch.testing.assert_close(lo, lr, **TOL)
        torch.testing.assert_close(po, pr, **TOL)
        torch.testing.assert_close(gzo, gzr, **TOL)
        for name, a, b in zip(["weight", "cluster_size", "embed_avg"], ours.state_dict().values(), state):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} step {step}: {m}")
    # eval: no update
    ours.eval()
    before = [t.clone() for t in ours.state_dict().values()]
    zo, lo, (_, _, io) = ours(torch.randn(B, C, H, W))
    assert all(torch.equal(a, b) for a, b in zip(before, ours.state_dict().values()))
    torch.testing.assert_close(ours.get_codebook_entry(io, (B, H, W, C)), zo, **TOL)
