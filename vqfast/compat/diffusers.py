"""Drop-in for diffusers' ``VectorQuantizer`` (``diffusers.models.autoencoders.vae``), the
quantizer of diffusers' ``VQModel``.

It is taming's ``VectorQuantizer2`` with the embedding dimension named ``vq_embed_dim``: same
state_dict key (``embedding.weight``), same ``legacy`` loss placement, ``remap``,
``sane_index_shape``, return value ``(z_q, loss, (None, None, indices))`` and
``get_codebook_entry``; the search, gather, losses and gradients run in one ``vqfast.quantize``.
"""
from __future__ import annotations

from vqfast.compat.taming import VectorQuantizer2


class VectorQuantizer(VectorQuantizer2):
    """diffusers' ``VectorQuantizer(n_e, vq_embed_dim, beta, remap, unknown_index, sane_index_shape, legacy)``."""

    def __init__(self, n_e, vq_embed_dim, beta, remap=None, unknown_index="random", sane_index_shape=False,
                 legacy=True):
        super().__init__(n_e, vq_embed_dim, beta, remap=remap, unknown_index=unknown_index,
                         sane_index_shape=sane_index_shape, legacy=legacy)
        self.vq_embed_dim = vq_embed_dim

    def forward(self, z):
        return super().forward(z)
