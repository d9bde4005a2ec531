"""nearest_code on a real GPU: the cuda and triton backends against the reference.

Marked `gpu`: skipped without a CUDA device (CI has none); run by `make gpu-check`.
"""
import time

import pytest
import torch

import vqfast
from tests.checks import assert_nearest

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ("cuda", "triton")
SHAPES = [(0, 3, 8), (1, 1, 1), (7, 3, 3), (1000, 1024, 64), (4097, 1000, 100), (70000, 1024, 64),
          (1000, 16384, 256), (7, 16384, 512), (3000, 513, 8)]


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    st = vqfast.backends()[request.param]
    if not (st.available and "cuda" in st.devices):
        pytest.fail(f"backend {request.param!r} must run on a GPU machine: {st.reason}")
    return request.param


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_against_definition(backend, metric, dtype):
    for n, k, d in SHAPES:
        z = torch.randn(n, d, device="cuda").to(dtype)
        cb = torch.randn(k, d, device="cuda").to(dtype)
        idx, dist = vqfast.nearest_code(z, cb, metric=metric, backend=backend)
        assert_nearest(z.cpu(), cb.cpu(), metric, idx.cpu(), dist.cpu(), brute_rows=2048)


def test_matches_reference_backend(backend):
    z = torch.randn(20000, 64, device="cuda")
    cb = torch.randn(4096, 64, device="cuda")
    i, d = vqfast.nearest_code(z, cb, backend=backend)
    i_ref, d_ref = vqfast.nearest_code(z, cb, backend="torch")
    assert (i == i_ref).float().mean() > 0.999
    torch.testing.assert_close(d, d_ref, rtol=1e-4, atol=1e-3)


def test_large_index_offsets(backend):
    """N x K beyond 2^31 (N=262144, K=16384): every row written, answers right on a sample."""
    z = torch.randn(262144, 8, device="cuda")
    cb = torch.randn(16384, 8, device="cuda")
    idx, dist = vqfast.nearest_code(z, cb, backend=backend)
    rows = torch.randint(0, z.shape[0], (2048,), device="cuda")
    assert_nearest(z[rows].cpu(), cb.cpu(), "l2", idx[rows].cpu(), dist[rows].cpu())
    assert int(idx.min()) >= 0 and int(idx.max()) < cb.shape[0]


def test_timing_sanity(backend):
    """Not a speed assertion: the kernel finishes, repeatably, and we print how long it took."""
    z = torch.randn(262144, 64, device="cuda")
    cb = torch.randn(1024, 64, device="cuda")
    vqfast.nearest_code(z, cb, backend=backend)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        vqfast.nearest_code(z, cb, backend=backend)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    print(f"{backend}: {dt * 1e3:.2f} ms, {2 * 262144 * 1024 * 64 / dt / 1e12:.1f} TFLOP/s")
    assert dt < 5.0, "kernel took seconds: hung or pathologically slow"
