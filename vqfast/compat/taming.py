"""Drop-ins for taming-transformers' quantizers (``taming.modules.vqvae.quantize``).

``VectorQuantizer2`` and ``EMAVectorQuantizer`` with taming's constructor signatures, state_dict
keys (``embedding.weight``; the EMA one ``embedding.weight``, ``embedding.cluster_size``,
``embedding.embed_avg``), channel-first ``(B, C, H, W)`` input, return values
``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))`` and ``get_codebook_entry``.
The search, gather, losses and their gradients run in one ``vqfast.quantize`` call (no N x K
distance matrix), the EMA codebook update in one ``vqfast.ema_update_`` call.

As in taming:

* ``VectorQuantizer2`` returns ``perplexity = None`` and ``min_encodings = None``; indices are
  flat ``(B*H*W,)`` (``(B*H*W, 1)`` with ``remap``), or ``(B, H, W)`` with ``sane_index_shape``.
  ``legacy=True`` (default) puts beta on the codebook term, ``legacy=False`` on the commitment term.
* ``EMAVectorQuantizer`` returns the perplexity of the batch's code use and the one-hot
  ``encodings`` ``(B*H*W, n_embed)`` (formed only because the interface returns it); the loss is
  ``beta * mse(z, sg(z_q))``, the codebook moves only by EMA (with Laplace smoothing) in training.
  taming's released ``EMAVectorQuantizer.__init__`` refers to undefined names and cannot be
  constructed; this is its evident intent.
* ``remap`` (a ``.npy`` of used indices, ``unknown_index`` "random", "extra" or an int) is
  implemented as taming does it: a post-processing of the indices (``used`` buffer in the state).

Differences: rows holding NaN/Inf are left out of the EMA statistics (``vqfast.ema_update_``);
nearest-code ties between equal distances may resolve differently from taming's expanded
``|z|^2 + |e|^2 - 2 z.e`` argmin where the two differ only by rounding.
vqfast's own option ``check_finite=True`` makes ``forward`` raise ValueError with the count of
NaN/Inf rows of ``z`` before any kernel runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.nn.check_finite import check_finite_rows
from vqfast.ops import quantize
from vqfast.ops.codebook import ema_update_


class _Remap:
    """taming's optional index remapping to a subset of used codes."""

    def _init_remap(self, n_e, remap, unknown_index):
        self.remap = remap
        if remap is not None:
            import numpy as np

            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index  # "random" or "extra" or an int
            if self.unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed = self.re_embed + 1
        else:
            self.re_embed = n_e

    def remap_to_used(self, inds):
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape).to(device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds):
        ishape = inds.shape
        assert len(ishape) > 1
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:  # extra token
            inds[inds >= self.used.shape[0]] = 0
        back = torch.gather(used[None, :][inds.shape[0] * [0], :], 1, inds)
        return back.reshape(ishape)

    def _lookup(self, indices, shape):
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


def _rows(z: torch.Tensor, dim: int) -> torch.Tensor:
    if z.ndim != 4 or z.shape[1] != dim:
        raise ValueError(f"expected z of shape (B, {dim}, H, W), got {tuple(z.shape)}")
    return z.permute(0, 2, 3, 1)                                   # b h w c (a view; quantize copies)


class VectorQuantizer2(_Remap, nn.Module):
    """taming-transformers' ``VectorQuantizer2``: nearest-code quantization of ``(B, C, H, W)``
    inputs with a learned codebook ``embedding.weight`` (n_e, e_dim), straight-through gradients."""

    backend: str | None = None  # vqfast backend (None: the fastest available)

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True,
                 check_finite=False):
        super().__init__()
        self.check_finite = bool(check_finite)  # vqfast's: NaN/Inf rows of z raise (vqfast/nn/check_finite.py)
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self._init_remap(n_e, remap, unknown_index)
        self.sane_index_shape = sane_index_shape

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        assert temp is None or temp == 1.0, "Only for interface compatible with Gumbel"
        assert rescale_logits is False, "Only for interface compatible with Gumbel"
        assert return_logits is False, "Only for interface compatible with Gumbel"
        zr = _rows(z, self.e_dim)
        if self.check_finite:
            check_finite_rows(type(self).__name__, zr, -1, name="z")
        b, h, w, _ = zr.shape
        r = quantize(zr, self.embedding.weight, metric="l2", estimator="ste", backend=self.backend)
        if self.legacy:  # taming's original (beta on the codebook term)
            loss = r.commit_loss + self.beta * r.codebook_loss
        else:
            loss = self.beta * r.commit_loss + r.codebook_loss
        z_q = r.z_q.permute(0, 3, 1, 2).contiguous()
        indices = r.indices.reshape(-1)
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(b, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices, shape):
        """Codes of flat ``indices``; with ``shape`` (B, H, W, C), returned as (B, C, H, W)."""
        return self._lookup(indices, shape)


class VectorQuantizer(VectorQuantizer2):
    """taming-transformers' first ``VectorQuantizer(n_e, e_dim, beta)``: the loss of
    ``VectorQuantizer2(legacy=True)``, and its extra outputs: the batch's code perplexity, the
    one-hot ``min_encodings`` ``(B*H*W, n_e)`` (formed only because the interface returns it)
    and indices of shape ``(B*H*W, 1)``."""

    def __init__(self, n_e, e_dim, beta, check_finite=False):
        super().__init__(n_e, e_dim, beta, legacy=True, check_finite=check_finite)

    def forward(self, z):
        z_q, loss, (_, _, indices) = super().forward(z)
        counts = torch.bincount(indices, minlength=self.n_e)
        e_mean = counts.to(z.dtype) / max(indices.numel(), 1)
        perplexity = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
        min_encodings = F.one_hot(indices, self.n_e).to(z.dtype)
        return z_q, loss, (perplexity, min_encodings, indices.unsqueeze(1))

    def get_codebook_entry(self, indices, shape):
        """Codes of flat ``indices``; with ``shape`` (B, H, W, C), returned as (B, C, H, W)."""
        return self._lookup(indices.reshape(-1), shape)


class EmbeddingEMA(nn.Module):
    """taming's ``EmbeddingEMA`` state: ``weight`` (randn init), ``cluster_size`` (zeros),
    ``embed_avg`` (a copy of weight), all ``nn.Parameter(requires_grad=False)`` as in taming."""

    def __init__(self, num_tokens, codebook_dim, decay=0.99, eps=1e-5):
        super().__init__()
        self.decay = decay
        self.eps = eps
        weight = torch.randn(num_tokens, codebook_dim)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(num_tokens), requires_grad=False)
        self.embed_avg = nn.Parameter(weight.clone(), requires_grad=False)
        self.update = True

    def forward(self, embed_id):
        return F.embedding(embed_id, self.weight)


class EMAVectorQuantizer(_Remap, nn.Module):
    """taming-transformers' ``EMAVectorQuantizer`` (its evident intent): nearest-code quantization
    of ``(B, C, H, W)`` inputs, loss ``beta * mse(z, sg(z_q))``, and in training an EMA update of
    ``embedding.cluster_size`` / ``embedding.embed_avg`` with the codebook rewritten as
    ``embed_avg / laplace_smoothed(cluster_size)``."""

    backend: str | None = None

    def __init__(self, n_embed, embedding_dim, beta, decay=0.99, eps=1e-5, remap=None, unknown_index="random",
                 check_finite=False):
        super().__init__()
        self.check_finite = bool(check_finite)  # vqfast's: NaN/Inf rows of z raise (vqfast/nn/check_finite.py)
        self.codebook_dim = embedding_dim
        self.num_tokens = n_embed
        self.beta = beta
        self.embedding = EmbeddingEMA(n_embed, embedding_dim, decay, eps)
        self._init_remap(n_embed, remap, unknown_index)

    def forward(self, z):
        zr = _rows(z, self.codebook_dim)
        if self.check_finite:
            check_finite_rows(type(self).__name__, zr, -1, name="z")
        b = zr.shape[0]
        emb = self.embedding
        update = self.training and emb.update
        codebook = emb.weight.detach()
        if update:  # the update below rewrites the codebook in place; backward needs this step's
            codebook = codebook.clone()
        r = quantize(zr, codebook, metric="l2", estimator="ste", backend=self.backend)
        indices = r.indices.reshape(-1)
        counts = torch.bincount(indices, minlength=self.num_tokens)
        avg_probs = counts.to(z.dtype) / max(indices.numel(), 1)
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
        encodings = F.one_hot(indices, self.num_tokens).type(z.dtype)

        if update:
            with torch.no_grad():
                dtype = torch.float64 if emb.weight.dtype == torch.float64 else torch.float32
                bufs = (emb.weight.data, emb.cluster_size.data, emb.embed_avg.data)
                work = tuple(t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous() for t in bufs)
                ema_update_(*work, zr.detach().reshape(-1, self.codebook_dim).to(dtype), indices,
                            decay=emb.decay, eps=emb.eps, backend=self.backend)
                for t, wt in zip(bufs, work):
                    if wt is not t:
                        t.copy_(wt)

        loss = self.beta * r.commit_loss
        z_q = r.z_q.permute(0, 3, 1, 2).contiguous()
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(b, -1)).reshape(-1)
        return z_q, loss, (perplexity, encodings, indices)

    def get_codebook_entry(self, indices, shape):
        """Codes of flat ``indices``; with ``shape`` (B, H, W, C), returned as (B, C, H, W)."""
        return self._lookup(indices, shape)
