"""vqfast: fused vector-quantization kernels for PyTorch."""
from vqfast import registry
from vqfast.ops import nearest_code

__version__ = "0.1.0"


def backends():
    """Status of each backend (torch, cpu, cuda, triton): available, devices, and why not."""
    return dict(registry.status())


__all__ = ["nearest_code", "backends", "__version__"]
