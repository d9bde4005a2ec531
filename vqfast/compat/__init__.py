"""Drop-in replacements for other projects' quantizer modules, on vqfast's fused ops.

* ``vqfast.compat.taming``: taming-transformers' ``VectorQuantizer2`` and ``EMAVectorQuantizer``.
"""
from vqfast.compat.taming import EMAVectorQuantizer, VectorQuantizer2

__all__ = ["VectorQuantizer2", "EMAVectorQuantizer"]
