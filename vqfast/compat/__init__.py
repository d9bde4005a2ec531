"""Drop-in replacements for other projects' quantizer modules, on vqfast's fused ops.

* ``vqfast.compat.taming``: taming-transformers' ``VectorQuantizer``, ``VectorQuantizer2`` and
  ``EMAVectorQuantizer``.
* ``vqfast.compat.diffusers``: diffusers' ``VectorQuantizer`` (the quantizer of ``VQModel``).
"""
from vqfast.compat.taming import EMAVectorQuantizer, VectorQuantizer, VectorQuantizer2

__all__ = ["VectorQuantizer", "VectorQuantizer2", "EMAVectorQuantizer"]
