"""vqfast's ops: validation, backend choice, fake kernels and autograd."""
from vqfast.ops.codebook import (CodebookStats, KMeansResult, codebook_stats, ema_update_, expire_codes_,
                                 kmeans)
from vqfast.ops.nearest_code import nearest_code
from vqfast.ops.quantize import QuantizeResult, quantize
from vqfast.ops.residual import residual_nearest_code

__all__ = ["nearest_code", "residual_nearest_code", "quantize", "QuantizeResult", "ema_update_", "expire_codes_", "kmeans", "KMeansResult",
           "codebook_stats", "CodebookStats"]
