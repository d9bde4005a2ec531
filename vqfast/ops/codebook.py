"""Codebook maintenance: the fused EMA update, dead-code restart, k-means init, usage statistics.

``ema_update_`` is a kernel in every backend (formulas: ``vqfast/reference/ema.py``);
the rest are short compositions of the kernels and torch ops.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vqfast import registry
from vqfast.ops.nearest_code import nearest_code
from vqfast.ops.validation import check_choice, check_codebook, check_float_tensor, check_vectors
from vqfast.reference import ema as reference


@torch.library.custom_op("vqfast::ema_update__torch", mutates_args=("codebook", "cluster_size", "embed_avg"),
                        device_types=("cpu", "cuda"))
def _ema_torch(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor, z: torch.Tensor,
               indices: torch.Tensor, decay: float, eps: float) -> None:
    reference.ema_update_(codebook, cluster_size, embed_avg, z, indices, decay, eps)


@torch.library.custom_op("vqfast::ema_update__triton", mutates_args=("codebook", "cluster_size", "embed_avg"),
                        device_types=("cpu", "cuda"))
def _ema_triton(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor, z: torch.Tensor,
                indices: torch.Tensor, decay: float, eps: float) -> None:
    from vqfast.triton.ema_update_ import ema_update_triton_

    ema_update_triton_(codebook, cluster_size, embed_avg, z, indices, decay, eps)


def _ema_fake(codebook, cluster_size, embed_avg, z, indices, decay, eps):
    return None


for _name in ("vqfast::ema_update__torch", "vqfast::ema_update__triton"):
    torch.library.register_fake(_name)(_ema_fake)
if registry.extension_has_op("ema_update_"):
    torch.library.register_fake("vqfast::ema_update_")(_ema_fake)


def _ema_op_for(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.vqfast.ema_update_.default
    return {"torch": torch.ops.vqfast.ema_update__torch.default,
            "triton": torch.ops.vqfast.ema_update__triton.default}[backend]


def check_indices(op: str, indices, shape: torch.Size, num_codes: int, device: torch.device | None = None) -> None:
    """indices: int64 of the given shape, on `device` when given, with values in [0, num_codes)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{op}: indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be int64, got {indices.dtype}")
    if device is not None and indices.device != device:
        raise ValueError(f"{op}: indices must be on {device} like the other tensors, got {indices.device}")
    if indices.device.type == "meta":
        raise ValueError(f"{op}: indices must hold values (not on the meta device) to be range-checked")
    if indices.shape != shape:
        raise ValueError(f"{op}: indices must have shape {tuple(shape)}, got {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_codes):
        raise ValueError(f"{op}: indices must lie in [0, {num_codes}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def _check_buffers(op: str, codebook, cluster_size, embed_sum) -> None:
    check_codebook(op, codebook)
    if codebook.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: codebook must be float32 or float64 (EMA statistics need the precision), "
                        f"got {codebook.dtype}")
    k, d = codebook.shape
    check_float_tensor(op, "cluster_size", cluster_size)
    check_float_tensor(op, "embed_sum", embed_sum)
    if cluster_size.shape != (k,):
        raise ValueError(f"{op}: cluster_size must have shape ({k},), got {tuple(cluster_size.shape)}")
    if embed_sum.shape != (k, d):
        raise ValueError(f"{op}: embed_sum must have shape ({k}, {d}), got {tuple(embed_sum.shape)}")
    for name, t in (("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if t.dtype != codebook.dtype:
            raise TypeError(f"{op}: {name} must have the codebook's dtype {codebook.dtype}, got {t.dtype}")
        if t.device != codebook.device:
            raise ValueError(f"{op}: {name} must be on the codebook's device {codebook.device}, got {t.device}")
    for name, t in (("codebook", codebook), ("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (it is updated in place)")


def ema_update_(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
                indices: torch.Tensor, *, decay: float, eps: float = 1e-5, backend: str | None = None) -> None:
    """EMA codebook update, in place and fused (VQ-VAE appendix A.1).

    ``cluster_size`` (K,) and ``embed_sum`` (K, D) are the running EMA buffers
    (vector-quantize-pytorch's ``cluster_size`` / ``embed_avg``, taming's
    ``cluster_size`` / ``embed_avg``); ``codebook`` (K, D) is rewritten as
    ``embed_sum / laplace_smoothed(cluster_size)``. ``z`` (..., D) are the
    batch vectors and ``indices`` (...) their codes. Rows of ``z`` holding a
    NaN or Inf are skipped. Deterministic on the CPU; on CUDA with
    ``torch.use_deterministic_algorithms(True)``.
    """
    _check_buffers("ema_update_", codebook, cluster_size, embed_sum)
    check_vectors("ema_update_", z, codebook)
    check_indices("ema_update_", indices, z.shape[:-1], codebook.shape[0], codebook.device)
    if not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        raise ValueError(f"ema_update_: decay must be a float in [0, 1], got {decay!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0.0):
        raise ValueError(f"ema_update_: eps must be a float >= 0, got {eps!r}")
    name = registry.resolve(backend, codebook.device, "ema_update_")
    z2 = z.reshape(-1, z.shape[-1]).contiguous()
    _ema_op_for(name)(codebook, cluster_size, embed_sum, z2, indices.reshape(-1).contiguous(), float(decay),
                      float(eps))


def expire_codes_(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor, z: torch.Tensor,
                  threshold: float, *, reset_cluster_size: float | None = None,
                  generator: torch.Generator | None = None) -> int:
    """Restart dead codes: every code whose EMA count is below ``threshold`` is
    replaced by a randomly chosen batch vector (without replacement; if there are
    more dead codes than vectors, a random subset of them, the rest wait for a
    later batch). Its ``cluster_size`` is reset to ``reset_cluster_size``
    (default: ``threshold``) and ``embed_sum`` to the vector times that count,
    so the next EMA step keeps it. Non-finite batch rows are never chosen.
    Returns the number of codes replaced. Randomness comes from ``generator``
    (default: torch's global generator), so a seeded run is reproducible.
    """
    _check_buffers("expire_codes_", codebook, cluster_size, embed_sum)
    check_vectors("expire_codes_", z, codebook)
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"expire_codes_: threshold must be a number >= 0, got {threshold!r}")
    reset = float(threshold if reset_cluster_size is None else reset_cluster_size)
    dead = (cluster_size < threshold).nonzero().flatten()
    samples = z.reshape(-1, z.shape[-1])
    samples = samples[torch.isfinite(samples).all(-1)]
    if dead.numel() == 0 or samples.shape[0] == 0:
        return 0
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if dead.numel() > samples.shape[0]:
        keep = torch.randperm(dead.numel(), generator=generator, device=gen_device)[: samples.shape[0]]
        dead = dead[keep.to(dead.device)]
    pick = torch.randperm(samples.shape[0], generator=generator, device=gen_device)[: dead.numel()]
    chosen = samples[pick.to(samples.device)].to(codebook.dtype)
    codebook[dead] = chosen
    cluster_size[dead] = reset
    embed_sum[dead] = chosen * reset
    return int(dead.numel())


class KMeansResult(NamedTuple):
    centroids: torch.Tensor
    counts: torch.Tensor


def kmeans(z: torch.Tensor, num_clusters: int, iters: int = 10, *, metric: str = "l2", init: str = "kmeans++",
           generator: torch.Generator | None = None, backend: str | None = None) -> KMeansResult:
    """k-means on the rows of ``z`` (..., D), for codebook initialization.

    ``init="kmeans++"`` (Arthur & Vassilvitskii 2007) or ``"random"`` (distinct
    random rows), then ``iters`` Lloyd steps whose assignment is
    ``nearest_code`` (so the N x K matrix is never formed). An empty cluster
    keeps its previous centroid. With ``metric="cosine"`` the centroids are
    unit vectors (spherical k-means). Returns float32 (float64 for float64 input)
    centroids (K, D) and the last assignment's counts (K,).
    """
    check_float_tensor("kmeans", "z", z)
    if z.dim() < 2 or z.shape[-1] == 0:
        raise ValueError(f"kmeans: z must have shape (..., D) with D >= 1, got {tuple(z.shape)}")
    check_choice("kmeans", "metric", metric, ("l2", "cosine"))
    check_choice("kmeans", "init", init, ("kmeans++", "random"))
    registry.resolve(backend, z.device, "nearest_code")  # a bad backend fails here, before any work
    x = z.reshape(-1, z.shape[-1])
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    n = x.shape[0]
    if not isinstance(num_clusters, int) or not 1 <= num_clusters <= n:
        raise ValueError(f"kmeans: num_clusters must be an int in [1, {n}] (the number of rows), got {num_clusters!r}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"kmeans: iters must be an int >= 0, got {iters!r}")
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def rand_index(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator, device=gen_device))

    if init == "random":
        centroids = x[torch.randperm(n, generator=generator, device=gen_device)[:num_clusters].to(x.device)].clone()
    else:
        chosen = [rand_index(n)]
        best = ((x - x[chosen[0]]) ** 2).sum(-1)
        for _ in range(1, num_clusters):
            total = float(best.sum())
            if total <= 0:  # every row coincides with a centroid: pick uniformly among the rest
                nxt = rand_index(n)
            else:
                u = torch.rand((), generator=generator, device=gen_device, dtype=best.dtype).item() * total
                nxt = min(int(torch.searchsorted(best.cumsum(0), torch.tensor(u, dtype=best.dtype, device=best.device))), n - 1)
            chosen.append(nxt)
            best = torch.minimum(best, ((x - x[nxt]) ** 2).sum(-1))
        centroids = x[torch.tensor(chosen, device=x.device)].clone()
    counts = torch.zeros(num_clusters, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        idx, _ = nearest_code(x, centroids, metric=metric, backend=backend)
        counts, sums = reference.code_sums(x, idx, num_clusters, x.dtype)
        filled = counts > 0
        means = sums / counts.clamp_min(1).unsqueeze(-1)
        if metric == "cosine":
            means = torch.nn.functional.normalize(means, dim=-1)
        centroids = torch.where(filled.unsqueeze(-1), means, centroids)
    return KMeansResult(centroids, counts)


class CodebookStats(NamedTuple):
    counts: torch.Tensor      # (K,) int64 uses of each code
    usage: float              # fraction of codes used at least once
    perplexity: float         # exp(entropy of the code distribution); K when uniform, 1 when collapsed


def codebook_stats(indices: torch.Tensor, num_codes: int) -> CodebookStats:
    """Use counts, fraction of codes used, and perplexity of a batch of indices."""
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"codebook_stats: num_codes must be an int >= 1, got {num_codes!r}")
    check_indices("codebook_stats", indices, indices.shape if isinstance(indices, torch.Tensor) else (), num_codes)
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes)
    total = int(counts.sum())
    if total == 0:
        return CodebookStats(counts, 0.0, 0.0)
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return CodebookStats(counts, float((counts > 0).double().mean()), float(math.exp(float(entropy))))
