"""Memory must not grow with codebook size: vector-quantize-pytorch materializes a (B, N, K)
distance matrix (and its one-hot and gradient twins); vqfast's layers never form an N x K tensor.

Measured as the process's resident high-water mark above the memory in use before one training
step (vqfast.bench.PeakMemory: /proc/self/clear_refs + VmHWM). A positive control runs the same
measurement on vector-quantize-pytorch, so the test shows that the probe does see an N x K matrix."""
import pytest
import torch

from vqfast.bench import PeakMemory
from vqfast.nn import ResidualVQ, VectorQuantize

N, K, D = 4096, 16384, 32
NK_BYTES = N * K * 4  # one float32 N x K matrix: 256 MiB


@pytest.fixture(scope="module")
def probe():
    mem = PeakMemory(torch.device("cpu"))
    if not mem.cpu_ok:
        pytest.skip("/proc/self/clear_refs is not writable here: no resident high-water probe")
    return mem


def step(layer, x):
    def run():
        out, _, loss = layer(x)
        (out.square().sum() + loss.sum()).backward()
    return run


@pytest.mark.parametrize("kind", ["ema", "learnable", "residual"])
def test_training_step_peak_is_far_below_one_nk_matrix(probe, kind):
    torch.manual_seed(0)
    if kind == "residual":
        layer = ResidualVQ(dim=D, num_quantizers=2, codebook_size=K)
    elif kind == "learnable":
        layer = VectorQuantize(dim=D, codebook_size=K, learnable_codebook=True, ema_update=False)
    else:
        layer = VectorQuantize(dim=D, codebook_size=K)
    x = torch.randn(1, N, D, requires_grad=True)
    step(layer, x)()  # warm-up: lazily created buffers, thread pools
    peak = probe.measure(step(layer, x))
    assert peak < NK_BYTES / 4, f"{kind}: peak {peak / 2**20:.1f} MiB, one N x K matrix is {NK_BYTES / 2**20:.0f} MiB"


def test_probe_sees_vector_quantize_pytorch_matrix(probe):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    layer = vqp.VectorQuantize(dim=D, codebook_size=K)
    x = torch.randn(1, N, D, requires_grad=True)
    step(layer, x)()
    peak = probe.measure(step(layer, x))
    assert peak >= NK_BYTES, f"the probe measured {peak / 2**20:.1f} MiB for a layer that forms N x K matrices"
