"""Mixed precision: bf16/fp16 activations with an fp32 codebook, under torch.autocast and as plain
half tensors, on every CPU backend: no dtype errors, finite losses (Laplace smoothing's epsilon
must not underflow), fp32 codebook state, and the code chosen for each row as good as the one
float64 arithmetic picks on the same (rounded) inputs."""
import pytest
import torch
from torch import nn

from tests.conftest import cpu_backends
from vqfast.compat.taming import EMAVectorQuantizer, VectorQuantizer2
from vqfast.nn import ResidualVQ, VectorQuantize

HALF = [torch.bfloat16, torch.float16]
DIM, K = 16, 64


def chosen_gap(rows: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Float64 distance of each row to its chosen code minus its distance to the nearest code."""
    r, e = rows.double().reshape(-1, rows.shape[-1]), codebook.double()
    d = torch.cdist(r, e).square()
    return d.gather(1, idx.reshape(-1, 1)).squeeze(1) - d.min(1).values


def layer(kind, backend):
    torch.manual_seed(0)
    if kind == "vq_ema":
        m = VectorQuantize(dim=DIM, codebook_size=K, decay=0.8, eps=1e-5, threshold_ema_dead_code=1)
    elif kind == "vq_learnable":
        m = VectorQuantize(dim=DIM, codebook_size=K, learnable_codebook=True, ema_update=False)
    elif kind == "rvq":
        m = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=K)
    m.backend = backend
    if kind == "rvq":
        for vq in m.layers:
            vq.backend = backend
    return m


def codebook_of(m):
    return m.layers[0].codebook if isinstance(m, ResidualVQ) else m.codebook


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["vq_ema", "vq_learnable", "rvq"])
def test_autocast_training_step(kind, dtype, backend):
    """Linear -> quantizer -> Linear under torch.autocast(cpu, dtype): a training step runs, the loss
    is finite, gradients reach the encoder, and the codebook stays float32 and finite."""
    vq = layer(kind, backend)
    enc, dec = nn.Linear(8, DIM), nn.Linear(DIM, 8)
    x = torch.randn(2, 12, 8)
    with torch.autocast("cpu", dtype=dtype):
        h = enc(x)
        assert h.dtype == dtype
        q, idx, loss = vq(h)
        out = dec(q)
        total = (out.float() - x).square().mean() + loss.float().sum()
    assert torch.isfinite(total)
    total.backward()
    assert enc.weight.grad is not None and torch.isfinite(enc.weight.grad).all()
    for name, t in list(vq.named_parameters()) + list(vq.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == torch.float32, name
            assert torch.isfinite(t).all(), name
    if kind != "rvq":  # the chosen code is the nearest, to half-precision rounding of the input
        gap = chosen_gap(h.detach(), codebook_of(vq).detach() if kind == "vq_learnable" else codebook_of(vq),
                         idx)
        assert (gap >= 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", HALF)
def test_half_input_ema_eval_matches_nearest(dtype, backend):
    """Plain half inputs (no autocast), eval: indices are the nearest codes of the fp32 codebook
    to the half input (float64 check), the output has the input's dtype."""
    vq = layer("vq_ema", backend).eval()
    x = (torch.randn(3, 20, DIM) * 4).to(dtype)
    q, idx, loss = vq(x)
    assert q.dtype == dtype
    gap = chosen_gap(x, vq.codebook, idx)
    # fp32 accumulation: the chosen code is within fp32 rounding of the true minimum
    assert gap.max().item() <= 1e-4 * (x.double().square().sum(-1).max().item() + 1)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", HALF)
def test_half_input_laplace_smoothing_stays_finite(dtype, backend):
    """Many training steps with half inputs and codes that are never hit: vector-quantize-pytorch's
    failure is Laplace smoothing's eps underflowing in half precision (division by zero -> NaN
    codebook). Here the statistics are kept in fp32: the codebook stays finite."""
    vq = VectorQuantize(dim=DIM, codebook_size=K, decay=0.5, eps=1e-5)
    vq.backend = backend
    for _ in range(30):
        x = (torch.randn(1, 8, DIM) + 3).to(dtype)  # few rows, far from most codes: many zero counts
        q, idx, loss = vq(x)
        assert torch.isfinite(loss).all()
    cb = vq._codebook
    assert cb.embed.dtype == torch.float32 and torch.isfinite(cb.embed).all()
    assert torch.isfinite(cb.cluster_size).all() and torch.isfinite(cb.embed_avg).all()
    assert (cb.cluster_size < 1e-8).any()  # counts below half precision's range really occurred


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", HALF)
def test_taming_quantizers_autocast(dtype, backend):
    for quant in (VectorQuantizer2(K, DIM, 0.25), EMAVectorQuantizer(K, DIM, 0.25)):
        quant.backend = backend
        conv = nn.Conv2d(3, DIM, 1)
        x = torch.randn(2, 3, 4, 4)
        with torch.autocast("cpu", dtype=dtype):
            z = conv(x)
            z_q, loss, (_, _, idx) = quant(z)
        assert torch.isfinite(loss) and torch.isfinite(z_q).all()
        (z_q.float().square().mean() + loss.float()).backward()
        assert torch.isfinite(conv.weight.grad).all()
        assert quant.embedding.weight.dtype == torch.float32 and torch.isfinite(quant.embedding.weight).all()
