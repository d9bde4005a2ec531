"""vqfast: fused vector-quantization kernels for PyTorch."""
from vqfast import registry
from vqfast.patching import PatchReport, patch
from vqfast.ops import (CodebookStats, KMeansResult, QuantizeResult, codebook_stats, ema_update_, expire_codes_,
                        kmeans, nearest_code, quantize, residual_nearest_code)

__version__ = "0.1.0"


def backends():
    """Status of each backend (torch, cpu, cuda, triton): available, devices, and why not."""
    return dict(registry.status())


__all__ = ["patch", "PatchReport", "nearest_code", "residual_nearest_code", "quantize", "QuantizeResult", "ema_update_", "expire_codes_", "kmeans", "KMeansResult",
           "codebook_stats", "CodebookStats", "backends", "__version__"]
