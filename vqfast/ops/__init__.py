"""vqfast's ops: validation, backend choice, fake kernels and autograd."""
from vqfast.ops.nearest_code import nearest_code

__all__ = ["nearest_code"]
from vqfast.ops.quantize import QuantizeResult, quantize  # noqa: E402

__all__ += ["quantize", "QuantizeResult"]
