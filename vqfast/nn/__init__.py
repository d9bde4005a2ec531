"""Drop-in nn.Modules built on vqfast's fused ops."""
from vqfast.nn.residual_vq import GroupedResidualVQ, ResidualVQ
from vqfast.nn.vector_quantize import LossBreakdown, VectorQuantize

__all__ = ["VectorQuantize", "LossBreakdown", "ResidualVQ", "GroupedResidualVQ"]
