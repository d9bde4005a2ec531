"""``vqfast.nn.VectorQuantize``: a drop-in for ``vector_quantize_pytorch.VectorQuantize``.

Same constructor, same ``forward`` contract, same buffers (``_codebook.embed``,
``_codebook.cluster_size``, ``_codebook.embed_avg``, ``_codebook.initted``) as
vector-quantize-pytorch 1.32.0, so checkpoints load both ways; the work is done
by vqfast's fused ops:

* search + gather + commitment loss + gradients (straight-through or rotation
  trick): ``vqfast.quantize``, one call per codebook (heads sharing a codebook
  are folded into the batch);
* EMA of ``cluster_size`` / ``embed_avg`` and the codebook rewrite: ``vqfast.ema_update_``;
* dead-code restart: ``vqfast.expire_codes_``; k-means init: ``vqfast.kmeans``.

No (rows x codebook_size) distance matrix is formed, except in the cross-entropy
losses (``forward(..., indices=...)`` and ``commitment_use_cross_entropy_loss``) and
in Gumbel sampling (``stochastic_sample_codes``), which need every logit: those are
computed in row chunks (at most ``_CE_CHUNK_ELEMS`` logits at a time, recomputed in
backward for the losses).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.ops import expire_codes_, kmeans, nearest_code, quantize
from vqfast.ops.codebook import ema_update_
from vqfast.reference.ema import code_sums, finite_rows
from vqfast.nn import distributed
from vqfast.nn.check_finite import check_finite_rows
from vqfast import registry
from vqfast.ops.quantize import QuantizeResult, backward_op_for
from vqfast.reference.nearest_code import METRICS, accumulation_dtype
from vqfast.reference.quantize import ESTIMATORS

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])

# vector-quantize-pytorch's l2norm: F.normalize with eps 1e-6 (the inputs' transform in the cosine
# path, the codebook after an EMA step, the orthogonal regularizer).
L2NORM_EPS = 1e-6
_CE_CHUNK_ELEMS = 1 << 22

# Constructor arguments of vector_quantize_pytorch.VectorQuantize that this layer does not
# implement, with their defaults: a non-default value raises NotImplementedError naming it.
UNSUPPORTED_INIT_ARGS = {
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_affine_param": False,
    "vq_bridge": None,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
}
# The same for forward's keyword arguments.
UNSUPPORTED_FORWARD_ARGS = {
    "topk": None,
    "codebook_transform_fn": None,
}


def _is_default(value, default) -> bool:
    if default is None:
        return value is None
    try:
        return bool(value == default)
    except Exception:  # e.g. a tensor of several values
        return False


def _check_unsupported(where: str, given: dict, defaults: dict, why: str) -> None:
    for name, default in defaults.items():
        if not _is_default(given[name], default):
            raise NotImplementedError(f"vqfast.nn.VectorQuantize{where}: {name}={given[name]!r} is not supported "
                                      f"(only the default, {default!r}); {why}")


def _l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1, eps=L2NORM_EPS)


def _laplace_smoothed(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """(N_k + eps) / (n + K eps) * n over the last dim: the EMA's smoothed counts."""
    total = cluster_size.sum(dim=-1, keepdim=True)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


def orthogonal_loss(codes: torch.Tensor) -> torch.Tensor:
    """Orthogonal regularizer of Shin et al. 2021 (arXiv 2112.00384, eq. 2) as vector-quantize-pytorch
    defines it: ``sum(cos_sim(e_i, e_j)^2) / (h n^2) - 1/n`` over ``codes`` (h, n, d).

    sum_ij (N N^T)_ij^2 = ||N N^T||_F^2 = ||N^T N||_F^2, so the Gram matrix is taken on the
    smaller side: (h, d, d) when d < n, never the n x n one then.
    """
    h, n, d = codes.shape
    normed = _l2norm(codes)
    gram = normed.transpose(-1, -2) @ normed if d < n else normed @ normed.transpose(-1, -2)
    return gram.pow(2).sum() / (h * n ** 2) - 1.0 / n


def _code_logits(z: torch.Tensor, codebook: torch.Tensor, cosine: bool) -> torch.Tensor:
    """vector-quantize-pytorch's distances (logits) of rows z (M, d) to codes (K, d): z.e for cosine
    (unit inputs), else -cdist: -sqrt(max(|z|^2 + |e|^2 - 2 z.e, 1e-8))."""
    dot = z @ codebook.t()
    if cosine:
        return dot
    sq = z.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2.0 * dot
    return -sq.clamp(min=1e-8).sqrt()


def _ce_chunk(z: torch.Tensor, codebook: torch.Tensor, targets: torch.Tensor, cosine: bool) -> torch.Tensor:
    return F.cross_entropy(_code_logits(z, codebook, cosine), targets, ignore_index=-1, reduction="sum")


def _cross_entropy_to_codes(z: torch.Tensor, codebook: torch.Tensor, targets: torch.Tensor, cosine: bool):
    """Mean cross-entropy of the codes' logits (negative distance, or dot for cosine) against
    ``targets`` (-1 ignored), over z (C, M, d), codebook (C, K, d), targets (C, M); in row chunks
    recomputed in backward, so at most _CE_CHUNK_ELEMS logits exist at once."""
    from torch.utils.checkpoint import checkpoint

    k = codebook.shape[1]
    rows = max(1, _CE_CHUNK_ELEMS // max(k, 1))
    total = z.new_zeros(())
    for c in range(z.shape[0]):
        for r0 in range(0, z.shape[1], rows):
            args = (z[c, r0:r0 + rows], codebook[c], targets[c, r0:r0 + rows], cosine)
            if torch.is_grad_enabled() and (z.requires_grad or codebook.requires_grad):
                total = total + checkpoint(_ce_chunk, *args, use_reentrant=False)
            else:
                total = total + _ce_chunk(*args)
    return total / (targets != -1).sum()


@torch.no_grad()
def gumbel_sample_codes(z: torch.Tensor, codebook: torch.Tensor, temperature: float, cosine: bool,
                        chunk_elems: int | None = None) -> torch.Tensor:
    """Codes drawn from softmax(logits / temperature) by the Gumbel-max trick, as
    vector-quantize-pytorch's ``gumbel_sample(stochastic=True)``: argmax_k(l_ik / T + g_ik) with
    g = -log(-log(u)), u ~ U(0, 1) (both logs clamped at 1e-20), for rows z (C, M, d) and
    codebooks (C, K, d); returns (C, M) int64.

    Sampling needs every logit, but never all at once: rows go in chunks of at most ``chunk_elems``
    (default ``_CE_CHUNK_ELEMS``) logits. The uniforms are drawn chunk by chunk in the (C, M, K)
    order of vector-quantize-pytorch's single ``uniform_`` call; torch's CPU generator draws
    serially, so on the CPU a seeded run picks the same codes. CUDA's Philox generator offsets
    each call, so there the codes follow the same distribution but are other draws.
    """
    chunk_elems = _CE_CHUNK_ELEMS if chunk_elems is None else chunk_elems
    num_cb, m = z.shape[:2]
    rows = max(1, chunk_elems // max(codebook.shape[1], 1))
    out = torch.empty(num_cb, m, dtype=torch.int64, device=z.device)
    for c in range(num_cb):
        for r0 in range(0, m, rows):
            logits = _code_logits(z[c, r0:r0 + rows], codebook[c], cosine)
            # in place, the same ops in the same order as vector-quantize-pytorch: same values
            gumbel = torch.empty_like(logits).uniform_(0, 1)
            gumbel.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()
            out[c, r0:r0 + rows] = logits.div_(temperature).add_(gumbel).argmax(dim=-1)
    return out


def _check_ema_update_weight(weight, num_codebooks: int, codebook_size: int) -> None:
    """ema_update_weight as vector-quantize-pytorch's ema_inplace takes it: a number, or a float
    tensor (K,) (one codebook) or (C, K) scaling each code's EMA step."""
    if weight is None or (isinstance(weight, (int, float)) and not isinstance(weight, bool)):
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"ema_update_weight must be a number, a tensor or a callable(embed_sum, cluster_size), "
                        f"got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"ema_update_weight must be a floating-point tensor, got {weight.dtype}")
    shapes = [(num_codebooks, codebook_size)] + ([(codebook_size,)] if num_codebooks == 1 else [])
    if tuple(weight.shape) not in shapes:
        raise ValueError(f"ema_update_weight must have shape {' or '.join(map(str, shapes))} (codebooks, codes), "
                         f"got {tuple(weight.shape)}")


def _ema_lerp_(old: torch.Tensor, new: torch.Tensor, decay: float, weight) -> None:
    """vector-quantize-pytorch's ema_inplace: statistics accumulated by ``accum_ema_update`` (held in
    ``old.grad``, as there) join this batch's, then old <- lerp(old, new, (1 - decay) * weight)."""
    if old.grad is not None:
        new = new + old.grad
        old.grad = None
    if isinstance(weight, torch.Tensor):
        weight = weight.reshape(-1, old.shape[1])                   # (K,) -> (1, K)
        weight = weight.reshape(*weight.shape, *(1,) * (old.ndim - 2)).to(old)
    step = (1. - decay) * (1. if weight is None else weight)
    old.data.lerp_(new.to(old), step if isinstance(step, torch.Tensor) else float(step))


def _accumulate_(t: torch.Tensor, value: torch.Tensor) -> None:
    """vector-quantize-pytorch's accum_grad_: pending EMA statistics live in the buffer's ``.grad``."""
    if t.grad is not None:
        t.grad.add_(value.to(t.grad))
    else:
        t.grad = value.to(t).clone().detach()


class _QuantizeChosen(torch.autograd.Function):
    """Gather + squared error forward, vqfast's fused quantize backward (any estimator) for given codes."""

    @staticmethod
    def forward(ctx, z, codebook, indices, metric: int, estimator: int, through_output: bool, backend: str):
        z_q = F.embedding(indices, codebook)
        acc = accumulation_dtype(z.dtype)
        sq_err = torch.linalg.vector_norm(z - z_q, dtype=acc).square()
        commit = sq_err / max(z.numel(), 1)
        ctx.mark_non_differentiable(indices)
        ctx.flags = (metric, estimator, through_output, backend)
        ctx.save_for_backward(z, codebook, indices)
        return z_q, commit, commit.clone()

    @staticmethod
    def backward(ctx, grad_zq, grad_commit, grad_codebook_loss):
        z, codebook, indices = ctx.saved_tensors
        metric, estimator, through_output, backend = ctx.flags
        grad_z, grad_codebook = backward_op_for(backend)(
            grad_zq.contiguous(), grad_commit, grad_codebook_loss, z, codebook, indices, metric, estimator,
            through_output, torch.are_deterministic_algorithms_enabled())
        return grad_z, grad_codebook, None, None, None, None, None


def _quantize_chosen(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str = "l2",
                     estimator: str = "ste", codebook_grad_through_output: bool = False,
                     backend: str | None = None) -> QuantizeResult:
    """``vqfast.quantize``'s outputs and gradients for codes already chosen by a search elsewhere
    (``vqfast.residual_nearest_code`` in ResidualVQ's fused path): the forward is a gather and the
    squared error (metric l2 / dot, whose codes are not normalized), the backward vqfast's fused
    quantize backward op, so both paths differentiate alike."""
    if metric == "cosine":
        raise ValueError("_quantize_chosen: metric 'cosine' normalizes the codes; use quantize()")
    name = registry.resolve(backend, z.device, "quantize")
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    z_q, commit, codebook_loss = _QuantizeChosen.apply(
        z.to(dtype).contiguous(), codebook.to(dtype).contiguous(), indices, METRICS[metric], ESTIMATORS[estimator],
        codebook_grad_through_output, name)
    return QuantizeResult(z_q, indices, commit, codebook_loss)


class Codebook(nn.Module):
    """The codebook state, named and shaped as vector-quantize-pytorch's ``Codebook``
    (``embed`` (C, K, d): a buffer, or a parameter when learnable; ``embed_avg`` (C, K, d),
    ``cluster_size`` (C, K), ``initted`` ()), and its maintenance with vqfast's ops."""

    backend: str | None = None  # vqfast backend for the ops (None: the fastest available)

    def __init__(self, dim, codebook_size, num_codebooks=1, kmeans_init=False, kmeans_iters=10, decay=0.8,
                 eps=1e-5, threshold_ema_dead_code=2, learnable_codebook=False, ema_update=True,
                 manual_ema_update=False, use_cosine_sim=False, sync_codebook=False, sync_kmeans=True):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)  # the same draw as vector-quantize-pytorch's uniform_init
            if use_cosine_sim:
                embed = _l2norm(embed)
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.kmeans_iters = kmeans_iters
        self.decay = decay
        self.eps = eps
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.has_dead_code_replacement = threshold_ema_dead_code > 0
        self.reset_cluster_size = threshold_ema_dead_code
        self.learnable_codebook = learnable_codebook
        self.use_cosine_sim = use_cosine_sim
        # one codebook for the whole process group (vqfast/nn/distributed.py); sync_kmeans: k-means
        # init and dead-code restarts draw from every rank's rows, else from rank 0's only
        self.sync_codebook = sync_codebook
        self.sync_kmeans = sync_kmeans

        self._initted_seen = False
        self._group_state_shared = False
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
            if sync_codebook:  # every rank steps its optimizer with the same (mean) gradient
                self.embed.register_hook(distributed.average_gradient)
        else:
            self.register_buffer("embed", embed)

    def _syncs(self) -> bool:
        return self.sync_codebook and distributed.is_distributed()

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return _l2norm(x) if self.use_cosine_sim else x

    # -- maintenance, all in place and outside autograd ------------------------------------------

    def _work_buffers(self):
        """(embed, cluster_size, embed_avg) as tensors vqfast's in-place ops accept (fp32/fp64,
        one dtype, contiguous), and a function writing them back if they had to be copied."""
        originals = (self.embed.data, self.cluster_size, self.embed_avg)
        dtype = torch.float64 if originals[0].dtype == torch.float64 else torch.float32
        if all(t.dtype == dtype and t.is_contiguous() for t in originals):
            return originals, lambda: None
        work = tuple(t.to(dtype).contiguous() for t in originals)

        def write_back():
            for t, w in zip(originals, work):
                t.copy_(w)

        return work, write_back

    @torch.no_grad()
    def update_ema(self) -> None:
        """embed <- embed_avg / laplace_smoothed(cluster_size) (l2-normalized for cosine)."""
        smoothed = _laplace_smoothed(self.cluster_size, self.eps)
        embed = self.embed_avg / smoothed.unsqueeze(-1)
        if self.use_cosine_sim:
            embed = _l2norm(embed)
        self.embed.data.copy_(embed)

    @torch.no_grad()
    def init_embed_(self, data: torch.Tensor) -> None:
        """k-means init from the rows of ``data`` (C, M, d) (float), once (``initted``)."""
        if not self._group_state_shared and self.training and self._syncs():
            # ranks may have drawn different initial codebooks (or loaded different states): rank 0's
            # wins, at the first training forward, the first call every rank is sure to make together
            distributed.broadcast_(self.embed.data, self.cluster_size, self.embed_avg, self.initted)
            self._group_state_shared = True
            self._initted_seen = False
        if self._initted_seen:  # spares reading the flag (a device sync) every step
            return
        if bool(self.initted):
            self._initted_seen = True
            return
        if self._syncs():
            self._init_embed_synced_(data)
            return
        self._kmeans_init_(data)

    def _init_embed_synced_(self, data: torch.Tensor) -> None:
        """k-means on rank 0 over every rank's rows (rank 0's with sync_kmeans=False), then rank 0's
        codebook state on every rank. A rank holding no rows still joins each collective; with no
        rows at all the codebook stays uninitialized on every rank (next call tries again)."""
        if self.sync_kmeans:
            data = distributed.gather_rows(data)
        if distributed.is_leader() and data.shape[1] > 0:
            self._kmeans_init_(data)
        distributed.broadcast_(self.embed.data, self.cluster_size, self.embed_avg, self.initted)
        self._initted_seen = bool(self.initted)

    def _kmeans_init_(self, data: torch.Tensor) -> None:
        num_codes, num_samples = self.codebook_size, data.shape[1]
        metric = "cosine" if self.use_cosine_sim else "l2"
        if num_samples < num_codes:
            warnings.warn(f"k-means init received {num_samples} vectors for a codebook of {num_codes} - "
                          f"duplicates will be sampled")
        # A NaN/Inf row would turn every centroid it joins into NaN: k-means sees the finite rows only,
        # and a batch without any leaves the codebook uninitialized (the next batch tries again).
        rows = [data[c][finite_rows(data[c])] for c in range(data.shape[0])]
        if any(r.shape[0] == 0 for r in rows):
            return
        means, counts = [], []
        for c, x in enumerate(rows):
            if x.shape[0] >= num_codes:
                centroids, count = kmeans(x, num_codes, self.kmeans_iters, metric=metric, init="random",
                                          backend=self.backend)
            else:
                centroids, count = _kmeans_with_duplicates(x, num_codes, self.kmeans_iters, metric, self.backend)
            means.append(centroids)
            counts.append(count)
        means, counts = torch.stack(means), torch.stack(counts)
        self.embed_avg.copy_(means * counts.unsqueeze(-1))
        self.cluster_size.copy_(counts)
        self.update_ema()
        self.initted.fill_(True)
        self._initted_seen = True

    def _load_from_state_dict(self, *args, **kwargs):
        self._initted_seen = False  # a loaded state may not be initialized
        self._group_state_shared = False  # nor the same on every rank
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_(self, rows: torch.Tensor, indices: torch.Tensor, ema_update: bool | None = None,
                weight=None, accumulate: bool = False) -> None:
        """One training step of codebook maintenance from the batch rows (C, M, d) and their codes
        (C, M): EMA of cluster_size / embed_avg, the codebook rewrite (unless ema_update is off or
        manual), then dead-code expiry. vector-quantize-pytorch's ``update_codebook``.

        ``weight`` (its ``ema_update_weight``: a number, a tensor (K,) / (C, K), or a callable
        (embed_sum (C, K, d), cluster_size (C, K)) returning one) scales each code's EMA step;
        ``accumulate`` (its ``accum_ema_update``) only adds the batch statistics to the pending
        ones, which the next update without it folds into its EMA step."""
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        if (self._syncs() or weight is not None or accumulate or self.cluster_size.grad is not None
                or self.embed_avg.grad is not None):
            self._update_unfused_(rows, indices, ema_update, weight, accumulate)
            return
        (embed, cluster_size, embed_avg), write_back = self._work_buffers()
        rows = rows.to(embed.dtype)
        rewrite = ema_update and not self.manual_ema_update
        for c in range(rows.shape[0]):
            # Without the rewrite the EMA statistics still move (they drive dead-code expiry):
            # the fused op then writes its codebook into a scratch tensor.
            target = embed[c] if rewrite else torch.empty_like(embed[c])
            ema_update_(target, cluster_size[c], embed_avg[c], rows[c], indices[c], decay=self.decay, eps=self.eps,
                        backend=self.backend)
            if rewrite and self.use_cosine_sim:
                embed[c].copy_(_l2norm(embed[c]))
        self._expire(embed, cluster_size, embed_avg, rows)
        write_back()

    def _update_unfused_(self, rows, indices, ema_update: bool, weight, accumulate: bool) -> None:
        """The EMA step in separate torch ops (batch counts and sums, then vector-quantize-pytorch's
        lerp), for the per-code weights and the accumulated statistics that the fused ema_update_
        does not take. Non-finite rows are left out, as the fused op does."""
        acc = torch.float64 if self.embed_avg.dtype == torch.float64 else torch.float32
        counts, sums = [], []
        for c in range(rows.shape[0]):
            keep = finite_rows(rows[c])
            count, total = code_sums(rows[c][keep].to(acc), indices[c][keep], self.codebook_size, acc)
            counts.append(count)
            sums.append(total)
        cluster_size, embed_sum = torch.stack(counts), torch.stack(sums)
        if self._syncs():  # every rank's batch statistics, before any weighting (vector-quantize-pytorch's order)
            distributed.all_reduce_sum_(cluster_size, embed_sum)
        if callable(weight):
            weight = weight(embed_sum, cluster_size)
            _check_ema_update_weight(weight, self.num_codebooks, self.codebook_size)
        if accumulate:
            _accumulate_(self.cluster_size, cluster_size)
            _accumulate_(self.embed_avg, embed_sum)
            return
        _ema_lerp_(self.cluster_size, cluster_size, self.decay, weight)
        _ema_lerp_(self.embed_avg, embed_sum, self.decay, weight)
        if ema_update and not self.manual_ema_update:
            self.update_ema()
        (embed, cluster_size, embed_avg), write_back = self._work_buffers()
        self._expire(embed, cluster_size, embed_avg, rows.to(embed.dtype))
        write_back()

    def _expire(self, embed, cluster_size, embed_avg, rows) -> None:
        if not self.has_dead_code_replacement or not self.training:
            return
        if self._syncs():
            self._expire_synced_(embed, cluster_size, embed_avg, rows)
            return
        self._expire_local_(embed, cluster_size, embed_avg, rows)

    def _expire_synced_(self, embed, cluster_size, embed_avg, rows) -> None:
        """Dead-code restart decided on rank 0 from every rank's rows (rank 0's with
        sync_kmeans=False), then rank 0's codebook state on every rank. Rank 0 decides whether any
        code is dead, so every rank issues the same collectives whatever its rows."""
        leader = distributed.is_leader()
        any_dead = leader and bool((cluster_size < self.threshold_ema_dead_code).any())
        if not distributed.broadcast_flag(any_dead, cluster_size.device):
            return
        if self.sync_kmeans:
            rows = distributed.gather_rows(rows)
        if leader:
            self._expire_local_(embed, cluster_size, embed_avg, rows)
        distributed.broadcast_(embed, cluster_size, embed_avg)

    def _expire_local_(self, embed, cluster_size, embed_avg, rows) -> None:
        expired = cluster_size < self.threshold_ema_dead_code
        if not bool(expired.any()):
            return
        if self.use_cosine_sim:
            rows = _l2norm(rows)
        for c in range(rows.shape[0]):
            samples = rows[c]
            if samples.shape[0] == 0:
                continue
            if not bool(expired[c].any()):
                # vector-quantize-pytorch draws a permutation for every codebook once any code is
                # dead; drawing it here too keeps seeded runs identical.
                torch.randperm(samples.shape[0], device=samples.device)
                continue
            counts = cluster_size[c]
            dead = expired[c].nonzero().flatten()
            hidden = None
            if dead.numel() > samples.shape[0]:
                # More dead codes than rows: a random subset is restarted now, the rest later. Pick
                # it as vector-quantize-pytorch does (same draw, codes filled in index order) and hide
                # the others from expire_codes_ for this call.
                keep = torch.randperm(dead.numel(), device=samples.device)[:samples.shape[0]]
                waiting = torch.ones(dead.numel(), dtype=torch.bool, device=dead.device)
                waiting[keep.to(dead.device)] = False
                hidden = dead[waiting]
                saved = counts[hidden].clone()
                counts[hidden] = float("inf")
            expire_codes_(embed[c], counts, embed_avg[c], samples, self.threshold_ema_dead_code,
                          reset_cluster_size=self.reset_cluster_size)
            if hidden is not None:
                counts[hidden] = saved


@torch.no_grad()
def _no_autocast(device_type: str):
    """The codebook math runs in float32 whatever the autocast state, as in vector-quantize-pytorch."""
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _kmeans_with_duplicates(x: torch.Tensor, num_clusters: int, iters: int, metric: str, backend=None):
    """k-means with fewer rows than clusters, as vector-quantize-pytorch does it: the initial
    means are drawn with replacement, so some are duplicates that never win a row."""
    n = x.shape[0]
    means = x[torch.randint(0, n, (num_clusters,), device=x.device)]
    counts = torch.zeros(num_clusters, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        idx, _ = nearest_code(x, means, metric=metric, backend=backend)
        counts = torch.bincount(idx, minlength=num_clusters).to(x.dtype)
        sums = torch.zeros_like(means).index_add_(0, idx, x)
        new = sums / counts.clamp(min=1).unsqueeze(-1)
        if metric == "cosine":
            new = _l2norm(new)
        means = torch.where((counts == 0).unsqueeze(-1), means, new)
    return means, counts


class VectorQuantize(nn.Module):
    """Vector quantization layer, a drop-in for ``vector_quantize_pytorch.VectorQuantize`` (1.32.0).

    Supported, with vector-quantize-pytorch's meaning and defaults: ``dim, codebook_size,
    codebook_dim`` (``project_in`` / ``project_out`` Linear layers when ``codebook_dim * heads !=
    dim``), ``heads, separate_codebook_per_head, decay, eps, freeze_codebook, kmeans_init,
    kmeans_iters, use_cosine_sim, layernorm_after_project_in, threshold_ema_dead_code,
    channel_last, accept_image_fmap, accept_3d_fmap, commitment_weight,
    commitment_use_cross_entropy_loss, orthogonal_reg_weight, orthogonal_reg_active_codes_only,
    orthogonal_reg_max_codes, stochastic_sample_codes, sample_codebook_temp, straight_through,
    rotation_trick, ema_update, manual_ema_update, learnable_codebook, sync_update_v,
    return_zeros_for_masked_padding, route_gradients_to_input, sync_codebook, sync_kmeans``.
    ``forward`` accepts ``indices, mask, lens,
    sample_codebook_temp, freeze_codebook, return_loss_breakdown, ema_update, ema_update_weight,
    accum_ema_update``.

    ``stochastic_sample_codes=True`` draws each training code from softmax(logits /
    sample_codebook_temp) (Gumbel-max, ``gumbel_sample_codes``), computing the logits in row
    chunks, so the (rows x codebook_size) matrix never exists whole; on the CPU a seeded run
    draws the same codes as vector-quantize-pytorch, on CUDA other codes from the same
    distribution. ``ema_update_weight`` and ``accum_ema_update`` (statistics pending in the
    buffers' ``.grad``, as there) run the EMA step as separate torch ops instead of the fused one.

    ``sync_codebook`` (default None: True when built inside an initialized process group of more
    than one process) keeps one codebook for the group (``vqfast/nn/distributed.py``): the EMA
    statistics are summed over the ranks before the EMA step, k-means init and dead-code restarts
    run on rank 0 over every rank's rows (rank 0's only with ``sync_kmeans=False``) and are
    broadcast, and a learnable codebook's gradient is averaged over the ranks. Collectives run
    only in training forwards that update the codebook (and at k-means init), the same ones on
    every rank whatever its batch (empty, masked out, another length), so every rank must agree
    on ``training`` / ``freeze_codebook`` / ``ema_update`` per step, as DDP needs anyway.

    Not supported (NotImplementedError naming the argument when it is given a non-default value):
    ``codebook_diversity_loss_weight`` / ``codebook_diversity_temperature``,
    ``directional_reparam`` / ``directional_reparam_variance``, ``vq_bridge``,
    ``in_place_codebook_optimizer``, ``manual_in_place_optimizer_update``, ``affine_param`` and
    its ``sync_affine_param`` / ``affine_param_batch_decay`` / ``affine_param_codebook_decay``;
    and in ``forward``: ``topk``, ``codebook_transform_fn``. Also NotImplementedError: ``straight_through=True`` in the one case
    where its softmax gradient survives (training, the input not requiring grad, but the
    projected input or the codebook requiring it); a masked commitment loss with ``heads > 1``
    or a projection (vector-quantize-pytorch compares the quantized vectors with the
    unprojected, unsplit input there, and fails or broadcasts).

    Differences from vector-quantize-pytorch: rows holding a NaN/Inf are left out of the EMA
    statistics and never become a restarted code; k-means init and dead-code restart draw their
    random numbers from torch's CPU generator (vector-quantize-pytorch uses the tensors' device,
    so CUDA runs draw differently; CPU runs with the same seed match).

    Set ``backend`` (an attribute, default None: the fastest available) to run every op on one
    of vqfast's backends (``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``).

    ``check_finite=True`` (vqfast's own option) makes ``forward`` raise ValueError, before any
    kernel runs, when input rows hold NaN/Inf, with their count.
    """

    def __init__(self, dim, codebook_size, codebook_dim=None, heads=1, separate_codebook_per_head=False,
                 decay=0.8, eps=1e-5, freeze_codebook=False, kmeans_init=False, kmeans_iters=10, sync_kmeans=True,
                 use_cosine_sim=False, layernorm_after_project_in=False, threshold_ema_dead_code=0,
                 channel_last=True, accept_image_fmap=False, accept_3d_fmap=False, commitment_weight=1.,
                 commitment_use_cross_entropy_loss=False, orthogonal_reg_weight=0.,
                 orthogonal_reg_active_codes_only=False, orthogonal_reg_max_codes=None,
                 codebook_diversity_loss_weight=0., codebook_diversity_temperature=100.,
                 stochastic_sample_codes=False, sample_codebook_temp=1., straight_through=False, rotation_trick=None,
                 directional_reparam=False, directional_reparam_variance=5e-3, sync_codebook=None,
                 sync_affine_param=False, ema_update=None, vq_bridge=None, manual_ema_update=False,
                 learnable_codebook=None, in_place_codebook_optimizer=None, manual_in_place_optimizer_update=False,
                 affine_param=False, affine_param_batch_decay=0.99, affine_param_codebook_decay=0.9, sync_update_v=0.,
                 return_zeros_for_masked_padding=True, route_gradients_to_input=True, check_finite=False):
        super().__init__()
        given = dict(locals())
        _check_unsupported("", given, UNSUPPORTED_INIT_ARGS, "vqfast implements the deterministic nearest-code "
                           "quantizer with EMA / learnable codebooks")
        # vector-quantize-pytorch's default: one codebook for the group when built inside one
        sync_codebook = distributed.is_distributed() if sync_codebook is None else bool(sync_codebook)

        # vector-quantize-pytorch's defaults (directional_reparam and vq_bridge are unsupported: off).
        ema_update = True if ema_update is None else ema_update
        learnable_codebook = False if learnable_codebook is None else learnable_codebook
        rotation_trick = dim > 1 if rotation_trick is None else rotation_trick

        if use_cosine_sim and learnable_codebook:
            raise ValueError("cosine sim distance codebook not compatible with learnable codebook yet")
        if sum(map(int, (bool(straight_through), bool(rotation_trick)))) > 1:
            raise ValueError("at most one of straight_through and rotation_trick may be set (rotation_trick "
                             "defaults to True when dim > 1: pass rotation_trick=False with straight_through=True)")
        if straight_through and learnable_codebook:
            raise ValueError("gumbel straight through not allowed when learning the codebook")
        if ema_update and learnable_codebook:
            raise ValueError("learnable codebook not compatible with EMA update (pass ema_update=False)")
        if not 0 <= sync_update_v <= 1.:
            raise ValueError(f"sync_update_v must lie in [0, 1], got {sync_update_v!r}")
        if sync_update_v > 0. and not learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True")

        self.dim = dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = codebook_dim * heads
        requires_projection = codebook_input_dim != dim
        if requires_projection:
            lin = nn.Linear(dim, codebook_input_dim)
            self.project_in = (nn.Sequential(lin, nn.LayerNorm(codebook_input_dim))
                               if layernorm_after_project_in else lin)
            self.project_out = nn.Linear(codebook_input_dim, dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.has_projections = requires_projection
        self.codebook_dim = codebook_dim

        self.eps = eps
        self.has_commitment_loss = commitment_weight > 0.
        self.commitment_weight = commitment_weight
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.learnable_codebook = learnable_codebook

        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0.
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes

        self.rotation_trick = rotation_trick
        self.straight_through = straight_through
        self.sample_codebook_temp = sample_codebook_temp
        self.stochastic_sample_codes = stochastic_sample_codes
        self.sync_kmeans = sync_kmeans
        self.route_gradients_to_input = route_gradients_to_input
        self.check_finite = bool(check_finite)  # vqfast's: NaN/Inf input rows raise (vqfast/nn/check_finite.py)
        self.sync_update_v = sync_update_v

        self.use_cosine_sim = use_cosine_sim
        self._codebook = Codebook(
            dim=codebook_dim, codebook_size=codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, decay=decay, eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            learnable_codebook=self.has_codebook_orthogonal_loss or learnable_codebook,
            ema_update=ema_update, manual_ema_update=manual_ema_update, use_cosine_sim=use_cosine_sim,
            sync_codebook=sync_codebook, sync_kmeans=sync_kmeans)

        self.codebook_size = codebook_size
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        self.channel_last = channel_last
        self.register_buffer("zero", torch.tensor(0.), persistent=False)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.freeze_codebook = freeze_codebook

    # -- codebook access -------------------------------------------------------------------------

    @property
    def backend(self) -> str | None:
        """vqfast backend of every op this layer runs (None: the fastest available)."""
        return self._codebook.backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._codebook.backend = name

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> torch.Tensor:
        """(heads, K, codebook_dim) with separate codebooks per head, else (K, codebook_dim)."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        if not self.separate_codebook_per_head:
            codes = codes.unsqueeze(0)
        with torch.no_grad():
            self._codebook.embed.copy_(codes)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` as ``forward`` returns them: (b, ..., codebook_dim * heads) for
        separate codebooks, ``codebook[indices]`` otherwise; channel-first when the layer is."""
        codebook = self.codebook
        if codebook.ndim == 2:
            codes = codebook[indices]
        else:
            b, h = indices.shape[0], indices.shape[-1]
            flat = indices.reshape(b, -1, h)                               # (b, n, h)
            codes = codebook[torch.arange(h, device=flat.device), flat]    # (b, n, h, d)
            codes = codes.reshape(b, flat.shape[1], -1).reshape(*indices.shape[:-1], -1)
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices))

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None, _chosen_indices=None):
        """Quantize ``x``: (b, n, dim), (b, dim) (one token), (b, dim, n) with ``channel_last=False``,
        (b, dim, h, w) with ``accept_image_fmap``, (b, dim, d, h, w) with ``accept_3d_fmap``.

        Returns ``(quantized, indices, loss)`` (``quantized`` like ``x``; ``indices`` (b, n), or
        (b, n, heads) for heads > 1, -1 where ``mask`` is False; ``loss`` a scalar: in training,
        commitment_weight * mse(quantized code, input) (the code detached unless the codebook is
        learnable) plus orthogonal_reg_weight * the orthogonal regularizer; 0 in eval), plus a
        ``LossBreakdown`` with ``return_loss_breakdown``. With ``indices`` given, returns
        ``(quantized, cross_entropy)`` where quantized is still in the codebook layout (before the
        heads merge and project_out), as vector-quantize-pytorch does.
        """
        _check_unsupported(".forward", dict(topk=topk, codebook_transform_fn=codebook_transform_fn),
                           UNSUPPORTED_FORWARD_ARGS, "vqfast's quantizer returns the single nearest code")
        if self.check_finite:
            channel_first = self.accept_image_fmap or self.accept_3d_fmap or (not self.channel_last and x.ndim > 2)
            check_finite_rows("VectorQuantize", x, 1 if channel_first else -1)
        if not callable(ema_update_weight):
            _check_ema_update_weight(ema_update_weight, self._codebook.num_codebooks, self.codebook_size)
        if not isinstance(accum_ema_update, bool):
            raise TypeError(f"accum_ema_update must be a bool, got {type(accum_ema_update).__name__}")
        cb = self._codebook
        orig_input, input_requires_grad = x, x.requires_grad
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        if lens is not None:
            mask = torch.arange(x.shape[1], device=lens.device) < lens[:, None]

        only_one = x.ndim == 2
        if only_one:
            if mask is not None:
                raise ValueError("mask is not supported with a single token per batch item")
            x = x.unsqueeze(1)

        dtype, heads, training = x.dtype, self.heads, self.training
        return_loss = indices is not None
        need_transpose = not self.channel_last and not self.accept_image_fmap and not self.accept_3d_fmap \
            and not only_one
        if self.accept_image_fmap or self.accept_3d_fmap:
            if mask is not None:
                raise ValueError("mask is not supported with accept_image_fmap / accept_3d_fmap")
            spatial = x.shape[2:]
            x = x.flatten(2).transpose(1, 2)                      # b c ... -> b (...) c
        if need_transpose:
            x = x.transpose(1, 2)                                 # b d n -> b n d
            orig_input = orig_input.transpose(1, 2)

        x = self.project_in(x)
        b, n = x.shape[:2]
        x_rows = self._to_rows(x)                                 # (C, M, d), transformed
        d = x_rows.shape[-1]
        num_cb = x_rows.shape[0]
        row_mask = None if mask is None else self._mask_to_rows(mask)

        with _no_autocast(x.device.type):
            z = x_rows.float()
            cb.init_embed_(z.detach() if row_mask is None else z.detach()[:, row_mask])

            ema_now = cb.ema_update if ema_update is None else ema_update
            will_update = training and not freeze_codebook and (ema_now or cb.has_dead_code_replacement)
            embed = cb.embed
            codebook_grad = cb.learnable_codebook and embed.requires_grad and torch.is_grad_enabled()
            e = (embed if codebook_grad else embed.detach()).float()
            if will_update and e.data_ptr() == embed.data_ptr():
                e = e.clone()  # the update below rewrites the codebook in place; backward needs this one
            routing = training and input_requires_grad and self.route_gradients_to_input
            if (training and self.straight_through and temperature > 0 and not routing
                    and (z.requires_grad or codebook_grad)):
                raise NotImplementedError(
                    "vqfast.nn.VectorQuantize: straight_through=True sends gradients through the softmax of "
                    "every code's logit when the input does not require grad; that path is not implemented")
            metric = "dot" if self.use_cosine_sim else "l2"  # cosine: unit inputs against the stored codes
            estimator = "rotation" if (routing and self.rotation_trick) else "ste"
            commit_learnable = self.learnable_codebook and not freeze_codebook

            # _chosen_indices (internal, ResidualVQ's fused path): the codes a search run elsewhere picked
            # for these rows, (b * n,) for one codebook; the finishing below is the same.
            chosen = None if _chosen_indices is None else self._targets_to_rows(_chosen_indices, b, n)
            if chosen is None and training and self.stochastic_sample_codes and temperature > 0:
                # Gumbel sampling: codes drawn from softmax(logits / temperature), then finished alike
                chosen = gumbel_sample_codes(z.detach(), e.detach(), temperature, self.use_cosine_sim)
            quantized, embed_ind, commits = [], [], []
            for c in range(num_cb):
                if training:
                    # the codebook takes gradients from the loss only when it is learnable and not frozen
                    if chosen is not None:  # searched already: finish from the given codes
                        r = _quantize_chosen(z[c], e[c] if commit_learnable else e[c].detach(), chosen[c],
                                             metric, estimator, backend=self.backend)
                    else:
                        r = quantize(z[c], e[c] if commit_learnable else e[c].detach(), metric=metric,
                                     estimator=estimator, backend=self.backend)
                    if routing:
                        q = r.z_q
                    elif codebook_grad:
                        q = F.embedding(r.indices, e[c])
                    else:
                        q = r.z_q.detach()
                    commit = r.commit_loss
                    if commit_learnable:  # mse(code, z) with gradients to both: value once, two gradients
                        commit = commit + (r.codebook_loss - r.codebook_loss.detach())
                    commits.append(commit)
                else:
                    if chosen is not None:
                        r = _quantize_chosen(z[c].detach(), e[c], chosen[c], metric,
                                             codebook_grad_through_output=codebook_grad, backend=self.backend)
                    else:
                        r = quantize(z[c].detach(), e[c], metric=metric, codebook_grad_through_output=codebook_grad,
                                     backend=self.backend)
                    q = r.z_q
                quantized.append(q)
                embed_ind.append(r.indices)
            if num_cb == 1:
                q_rows, idx_rows = quantized[0].unsqueeze(0), embed_ind[0].unsqueeze(0)
            else:
                q_rows, idx_rows = torch.stack(quantized), torch.stack(embed_ind)   # (C, M, d), (C, M)

            if training and not freeze_codebook:
                rows, ids = z.detach(), idx_rows
                if row_mask is not None:
                    rows, ids = rows[:, row_mask], ids[:, row_mask]
                cb.update_(rows, ids, ema_update=ema_now, weight=ema_update_weight, accumulate=accum_ema_update)

        out_dtype = torch.promote_types(dtype, x_rows.dtype) if routing else dtype
        q_rows = q_rows.to(out_dtype)
        if training and self.sync_update_v > 0.:
            q_rows = q_rows + self.sync_update_v * (q_rows - q_rows.detach())

        if return_loss:
            targets = self._targets_to_rows(indices, b, n)
            ce = _cross_entropy_to_codes(z, e, targets, self.use_cosine_sim)
            return self._codebook_layout(q_rows, b, n), ce

        # indices back to (b, n) / (b, n, h)
        if heads == 1:
            embed_ind = idx_rows.reshape(b, n)
        elif self.separate_codebook_per_head:
            embed_ind = idx_rows.reshape(heads, b, n).permute(1, 2, 0)
        else:
            embed_ind = idx_rows.reshape(b, heads, n).permute(0, 2, 1)

        commit_loss = orthogonal_reg_loss = self.zero
        loss = self.zero
        if training:
            # vector-quantize-pytorch marks its `zero` buffer as requiring grad in training (so the
            # eval loss requires grad once the layer has trained); mirrored for identical behaviour.
            loss = self.zero.requires_grad_()
            if self.has_commitment_loss:
                if self.commitment_use_cross_entropy_loss:
                    targets = idx_rows if row_mask is None else idx_rows.masked_fill(~row_mask, -1)
                    commit_loss = _cross_entropy_to_codes(z, e, targets, self.use_cosine_sim)
                elif mask is not None:
                    commit_loss = self._masked_commit_loss(q_rows, idx_rows, e, orig_input, row_mask, dtype,
                                                           commit_learnable)
                else:
                    commit_loss = torch.stack(commits).mean()
                loss = loss + commit_loss * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                codebook = cb.embed  # after this step's EMA / expiry, as vector-quantize-pytorch
                if self.orthogonal_reg_active_codes_only:
                    if heads > 1 and self.separate_codebook_per_head:
                        raise ValueError("orthogonal regularization for only active codes not compatible with "
                                         "multi-headed with separate codebooks yet")
                    codebook = codebook[:, torch.unique(embed_ind)]
                num_codes = codebook.shape[-2]
                if self.orthogonal_reg_max_codes is not None and num_codes > self.orthogonal_reg_max_codes:
                    rand_ids = torch.randperm(num_codes, device=x_rows.device)[:self.orthogonal_reg_max_codes]
                    codebook = codebook[:, rand_ids]
                orthogonal_reg_loss = orthogonal_loss(codebook)
                loss = loss + orthogonal_reg_loss * self.orthogonal_reg_weight

        # quantized back to (b, n, h * d), then project out
        quantize_out = q_rows.reshape(q_rows.shape[0], b, n, d) if heads == 1 or self.separate_codebook_per_head \
            else q_rows.reshape(b, heads, n, d).transpose(0, 1)          # (h, b, n, d)
        quantize_out = quantize_out.permute(1, 2, 0, 3).reshape(b, n, heads * d)
        quantize_out = self.project_out(quantize_out)

        if mask is not None:
            masked_out_value = torch.zeros_like(orig_input) if self.return_zeros_for_masked_padding else orig_input
            quantize_out = torch.where(mask[..., None], quantize_out, masked_out_value)
            ind_mask = mask if embed_ind.ndim == 2 else mask[..., None]
            embed_ind = torch.where(ind_mask, embed_ind, -1)

        if need_transpose:
            quantize_out = quantize_out.transpose(1, 2)
        if self.accept_image_fmap or self.accept_3d_fmap:
            quantize_out = quantize_out.transpose(1, 2).reshape(b, quantize_out.shape[-1], *spatial)
            embed_ind = embed_ind.reshape(b, *spatial, *embed_ind.shape[2:])
        if only_one:
            quantize_out = quantize_out.squeeze(1)
            embed_ind = embed_ind.squeeze(1)

        if not return_loss_breakdown:
            return quantize_out, embed_ind, loss
        return quantize_out, embed_ind, loss, LossBreakdown(commit_loss, self.zero, orthogonal_reg_loss, self.zero)

    # -- helpers -----------------------------------------------------------------------------------

    def _to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, heads * d) in codebook space -> (C, M, d) rows per codebook, through the cosine
        transform, in vector-quantize-pytorch's order: (b n) for one head, (b h n) for heads
        sharing a codebook, (h, b n) for separate codebooks."""
        b, n = x.shape[:2]
        h = self.heads
        # sizes spelled out (no -1): an empty batch (b = 0, e.g. one rank's share) must reshape too
        x = self._codebook.transform_input(x.reshape(b, n, h, x.shape[-1] // h))   # (b, n, h, d)
        d = x.shape[-1]
        if h == 1:
            return x.reshape(1, b * n, d)
        if self.separate_codebook_per_head:
            return x.permute(2, 0, 1, 3).reshape(h, b * n, d)
        return x.permute(0, 2, 1, 3).reshape(1, b * h * n, d)

    def _mask_to_rows(self, mask: torch.Tensor) -> torch.Tensor:
        """(b, n) -> (M,), the rows' order within each codebook."""
        if self.heads > 1 and not self.separate_codebook_per_head:
            b, n = mask.shape
            mask = mask[:, None, :].expand(b, self.heads, n)
        return mask.reshape(-1)

    def _channel_last_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.accept_image_fmap or self.accept_3d_fmap:
            return x.flatten(2).transpose(1, 2)
        if not self.channel_last and x.ndim > 2:
            return x.transpose(1, 2)
        return x

    @torch.no_grad()
    def update_indices(self, x: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Codebook maintenance (EMA step, then dead-code expiry in training) for inputs ``x`` (as
        ``forward`` takes them) and given ``indices`` (as ``forward`` returns them; -1 counts as
        code 0, as in vector-quantize-pytorch), without quantizing."""
        if mask is not None and (self.accept_image_fmap or self.accept_3d_fmap):
            raise ValueError("mask is not supported with accept_image_fmap / accept_3d_fmap")
        x = self.project_in(self._channel_last_input(x))
        if x.ndim == 2:
            x, indices = x.unsqueeze(1), indices.unsqueeze(1)
        b, n = x.shape[:2]
        rows = self._to_rows(x).float()
        ids = self._targets_to_rows(indices.reshape(b, n, -1), b, n)
        ids = ids.masked_fill(ids == -1, 0)
        if mask is not None:
            row_mask = self._mask_to_rows(mask)
            rows, ids = rows[:, row_mask], ids[:, row_mask]
        self._codebook.update_(rows, ids)

    update_ema_indices = update_indices

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor) -> None:
        """Dead-code expiry (in training) from ``x`` (b, n, heads * codebook_dim), codebook space."""
        cb = self._codebook
        (embed, cluster_size, embed_avg), write_back = cb._work_buffers()
        cb._expire(embed, cluster_size, embed_avg, self._to_rows(x).float())
        write_back()

    def update_in_place_optimizer(self) -> None:
        """No in-place codebook optimizer here (``in_place_codebook_optimizer`` is unsupported)."""

    def _codebook_layout(self, q_rows: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """(C, M, d) rows as vector-quantize-pytorch's codebook returns them: (b, n, d) for one head,
        (h, b, n, d) for separate codebooks, (1, b h, n, d) for a shared one."""
        d = q_rows.shape[-1]
        if self.heads == 1:
            return q_rows.reshape(b, n, d)
        if self.separate_codebook_per_head:
            return q_rows.reshape(self.heads, b, n, d)
        return q_rows.reshape(1, b * self.heads, n, d)

    def _targets_to_rows(self, indices: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Codes (b, n) or (b, n, heads) in the rows' order (C, M)."""
        h = self.heads
        if h == 1:
            return indices.reshape(1, b * n)
        t = indices.reshape(b, n, h)
        if self.separate_codebook_per_head:
            return t.permute(2, 0, 1).reshape(h, b * n)
        return t.permute(0, 2, 1).reshape(1, b * h * n)

    def _masked_commit_loss(self, q_rows, idx_rows, e, orig_input, row_mask, dtype, commit_learnable):
        """vector-quantize-pytorch's masked commitment loss: the mean over the unmasked positions of
        mse(code, orig_input), against the input as given (before any projection, head split or, for
        cosine, normalization)."""
        if self.heads > 1 or self.has_projections:
            raise NotImplementedError(
                "vqfast.nn.VectorQuantize: a masked commitment loss with heads > 1 or a projection "
                "(codebook_dim * heads != dim) is not supported: vector-quantize-pytorch 1.32.0 compares the "
                "codes with the unprojected input there (shape error or a broadcast). Use mask=None, "
                "commitment_weight=0, or eval mode")
        codes = F.embedding(idx_rows[0], e[0]) if commit_learnable else q_rows[0].detach()
        target = orig_input.reshape(-1, orig_input.shape[-1])
        return F.mse_loss(codes.to(dtype)[row_mask], target[row_mask])
