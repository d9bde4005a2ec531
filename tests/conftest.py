import os
import zlib

# Triton's @jit reads this when vqfast.triton is imported: it must be set
# before anything imports vqfast, so the Triton kernels run on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import vqfast  # noqa: E402
from vqfast import registry  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: long profile, run with VQFAST_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA GPU visible to torch")
    slow = os.environ.get("VQFAST_SLOW_TESTS") == "1"
    skip_slow = pytest.mark.skip(reason="slow profile: set VQFAST_SLOW_TESTS=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different, reported seed per test: fresh random inputs, reproducible by node id.
    # (crc32, not hash(): str hashes are salted per process, so they would not reproduce)
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(seed)
    yield


def cpu_backends():
    """Backends that run on CPU tensors here: torch, cpu (extension), triton (interpreter)."""
    return registry.available("cpu")


def require_backend(name: str, device: str = "cpu"):
    st = vqfast.backends()[name]
    if not (st.available and device in st.devices):
        # The extension and triton are part of the build: missing them here is a failure, not a skip.
        if name in ("cpu", "triton") and device == "cpu":
            pytest.fail(f"backend {name!r} must run in this test environment: {st.reason}")
        pytest.skip(f"backend {name!r} unavailable on {device}: {st.reason}")
