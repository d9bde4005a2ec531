"""EMA codebook update (in place) in Triton.

Formulas: ``vqfast/reference/ema.py``; structure as csrc/cpu/ema_update.cpp.
With z (N, D) assigned to codes idx, decay gamma, w = 1 - gamma::

    N_k <- lerp(N_k, n_k, w)    m_k <- lerp(m_k, s_k, w)    (n_k, s_k: the batch counts, sums)
    e_k <- m_k / ((N_k + eps) / (sum_k N_k + K eps) * sum_k N_k)

``lerp`` is torch.lerp's formula (w < 0.5 ? a + w (b - a) : b - (b - a)(1 - w)).
Rows of z holding a NaN or Inf are skipped. Sums in the buffers' dtype
(float32 or float64).

Kernels, by mode (``torch.are_deterministic_algorithms_enabled()``):

* non-deterministic: ``_ema_accumulate_kernel`` (one program per row tile)
  checks each row for finiteness and atomically adds the kept rows into
  per-code counts (int32, exact) and sums (K, D); ``_ema_lerp_kernel`` (per
  code tile) applies the EMA to cluster_size and embed_avg in place.
* deterministic: ``_ema_keys_kernel`` writes each row's code, or K for a
  skipped row; the rows are sorted by that key (torch.sort, stable; segment
  offsets by torch.searchsorted) and ``_ema_segment_kernel``, one program per
  (code, D chunk), sums the code's rows in row order, a tile at a time, and
  applies the EMA to both buffers in place: no atomics, bit-reproducible.

Then the total n = cluster_size.sum() (torch.sum, fixed order, on device) and
``_ema_codebook_kernel`` (per code tile) rewrites the codebook from the
smoothed counts. Row and code indices are widened to int64 before they are
multiplied by D. On CPU tensors (Triton interpreter) small tiles are used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.triton.quantize import _check_d, _check_device, _device_ctx, _div, _sum, chunk_block, device_fn, row_blocks

__all__ = ["ema_update_triton_", "KERNELS"]

_SEGMENT_ROWS = 32
_CODE_TILE = 16


@device_fn
def _lerp(a, b, w):
    """torch.lerp(a, b, w)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@device_fn
def _finite_rows(z_ptr, blk, off, m_mask, D, BLOCK_D: tl.constexpr):
    """(BLOCK_M,) True where the row is in range and all its values are finite."""
    offs_d = tl.arange(0, BLOCK_D)
    ok = m_mask
    for d0 in range(0, D, BLOCK_D):
        mask = m_mask[:, None] & (offs_d < D - d0)[None, :]
        z = tl.load(z_ptr + blk + (off + d0), mask=mask, other=0.0)
        if z.dtype != tl.float64:
            z = z.to(tl.float32)  # exact for half inputs
        bad = tl.where(tl.abs(z) < float("inf"), 0, 1)  # NaN and +-Inf fail the comparison
        ok = ok & (_sum(bad, 1) == 0)
    return ok


@triton.jit
def _ema_accumulate_kernel(z_ptr, idx_ptr, counts_ptr, sums_ptr, N, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Atomic per-code counts (int32) and sums (K, D) of the finite rows in a row tile."""
    acc_ty: tl.constexpr = sums_ptr.dtype.element_ty
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N - row0
    blk = row0.to(tl.int64) * D
    off = offs_m[:, None] * D + offs_d[None, :]
    ok = _finite_rows(z_ptr, blk, off, m_mask, D, BLOCK_D)
    code = tl.load(idx_ptr + row0 + offs_m, mask=m_mask, other=0).to(tl.int64)
    tl.atomic_add(counts_ptr + code, tl.full([BLOCK_M], 1, dtype=tl.int32), mask=ok, sem="relaxed")
    s_off = code * D
    for d0 in range(0, D, BLOCK_D):
        mask = ok[:, None] & (offs_d < D - d0)[None, :]
        z = tl.load(z_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
        tl.atomic_add(sums_ptr + s_off[:, None] + (offs_d[None, :] + d0), z, mask=mask, sem="relaxed")


@triton.jit
def _ema_lerp_kernel(counts_ptr, sums_ptr, params_ptr, cs_ptr, ea_ptr, K, D,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """cluster_size <- lerp(cluster_size, counts, w), embed_avg <- lerp(embed_avg, sums, w), per code tile."""
    acc_ty: tl.constexpr = ea_ptr.dtype.element_ty
    w = tl.load(params_ptr)
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_mask = offs_k < K - k0
    cnt = tl.load(counts_ptr + k0 + offs_k, mask=k_mask, other=0).to(acc_ty)
    cs = tl.load(cs_ptr + k0 + offs_k, mask=k_mask, other=0.0)
    tl.store(cs_ptr + k0 + offs_k, _lerp(cs, cnt, w), mask=k_mask)
    blk = k0.to(tl.int64) * D
    off = offs_k[:, None] * D + offs_d[None, :]
    for d0 in range(0, D, BLOCK_D):
        mask = k_mask[:, None] & (offs_d < D - d0)[None, :]
        s = tl.load(sums_ptr + blk + (off + d0), mask=mask, other=0.0)
        ea = tl.load(ea_ptr + blk + (off + d0), mask=mask, other=0.0)
        tl.store(ea_ptr + blk + (off + d0), _lerp(ea, s, w), mask=mask)


@triton.jit
def _ema_keys_kernel(z_ptr, idx_ptr, key_ptr, N, D, K, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """key = the row's code, or K for a row with a non-finite value (sorted last, skipped)."""
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N - row0
    blk = row0.to(tl.int64) * D
    off = offs_m[:, None] * D + offs_d[None, :]
    ok = _finite_rows(z_ptr, blk, off, m_mask, D, BLOCK_D)
    code = tl.load(idx_ptr + row0 + offs_m, mask=m_mask, other=0).to(tl.int64)
    tl.store(key_ptr + row0 + offs_m, tl.where(ok, code, K), mask=m_mask)


@triton.jit
def _ema_segment_kernel(z_ptr, order_ptr, offsets_ptr, params_ptr, cs_ptr, ea_ptr, D,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (k, c): the sum of code k's rows (order_ptr[offsets[k]:offsets[k+1]],
    ascending row ids) over the c-th D chunk, in row order, then the EMA of
    embed_avg[k, chunk] and (c == 0) of cluster_size[k], in place."""
    acc_ty: tl.constexpr = ea_ptr.dtype.element_ty
    k = tl.program_id(0)
    c = tl.program_id(1)
    d0 = c * BLOCK_D
    w = tl.load(params_ptr)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D - d0
    start = tl.load(offsets_ptr + k).to(tl.int32)
    end = tl.load(offsets_ptr + k + 1).to(tl.int32)
    acc = tl.zeros([BLOCK_D], dtype=acc_ty)
    for r0 in range(start, end, BLOCK_R):
        r_mask = offs_r < end - r0
        rows = tl.load(order_ptr + r0 + offs_r, mask=r_mask, other=0).to(tl.int64)
        mask = r_mask[:, None] & d_mask[None, :]
        z = tl.load(z_ptr + rows[:, None] * D + (offs_d[None, :] + d0), mask=mask, other=0.0).to(acc_ty)
        acc += _sum(z, 0)
    row = ea_ptr + k.to(tl.int64) * D + d0 + offs_d
    ea = tl.load(row, mask=d_mask, other=0.0)
    tl.store(row, _lerp(ea, acc, w), mask=d_mask)
    if c == 0:
        cs = tl.load(cs_ptr + k)
        tl.store(cs_ptr + k, _lerp(cs, (end - start).to(acc_ty), w))


@triton.jit
def _ema_codebook_kernel(cs_ptr, ea_ptr, params_ptr, n_ptr, denom_ptr, cb_ptr, K, D,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """codebook = embed_avg / ((cluster_size + eps) / denom * n), per code tile;
    n = sum(cluster_size), denom = n + K eps (0-d tensors)."""
    eps = tl.load(params_ptr + 1)
    n = tl.load(n_ptr)
    denom = tl.load(denom_ptr)
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_mask = offs_k < K - k0
    cs = tl.load(cs_ptr + k0 + offs_k, mask=k_mask, other=1.0)
    smoothed = _div(cs + eps, denom) * n
    blk = k0.to(tl.int64) * D
    off = offs_k[:, None] * D + offs_d[None, :]
    for d0 in range(0, D, BLOCK_D):
        mask = k_mask[:, None] & (offs_d < D - d0)[None, :]
        ea = tl.load(ea_ptr + blk + (off + d0), mask=mask, other=0.0)
        tl.store(cb_ptr + blk + (off + d0), _div(ea, smoothed[:, None]).to(cb_ptr.dtype.element_ty), mask=mask)


def ema_update_triton_(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_avg: torch.Tensor, z: torch.Tensor,
                       indices: torch.Tensor, decay: float, eps: float) -> None:
    """The EMA update of reference/ema.py, in place. codebook / embed_avg (K, D) and
    cluster_size (K,): contiguous, float32 or float64, one dtype; z (N, D) any float
    dtype; indices int64 (N,)."""
    K, D = codebook.shape
    N = z.shape[0]
    acc = cluster_size.dtype
    if acc not in (torch.float32, torch.float64) or codebook.dtype != acc or embed_avg.dtype != acc:
        raise TypeError("ema_update_triton_: codebook, cluster_size and embed_avg must share a float32/float64 dtype")
    for name, t in (("codebook", codebook), ("cluster_size", cluster_size), ("embed_avg", embed_avg)):
        if not t.is_contiguous():
            raise ValueError(f"ema_update_triton_: {name} must be contiguous (it is updated in place)")
    interp = _check_device(codebook, "ema_update_triton_")
    _check_d(D, "ema_update_triton_")
    z, indices = z.contiguous(), indices.contiguous()
    dev = codebook.device
    # [w, eps] in the buffers' dtype (as torch rounds a Python float against a
    # tensor), filled on the device: no host-to-device copy (CUDA-graph safe).
    params = torch.full((2,), float(eps), dtype=acc, device=dev)
    params[0].fill_(1.0 - float(decay))
    bm, bd = row_blocks(D, z.dtype, interp)
    cbd = chunk_block(D, acc, interp)
    code_grid = (triton.cdiv(K, _CODE_TILE),)
    with _device_ctx(codebook):
        if torch.are_deterministic_algorithms_enabled():
            if N > 0:
                key = torch.full((N,), -1, dtype=torch.int64, device=dev)
                _ema_keys_kernel[(triton.cdiv(N, bm),)](z, indices, key, N, D, K, BLOCK_M=bm, BLOCK_D=bd)
                sorted_key, order = torch.sort(key, stable=True)
            else:
                sorted_key = order = torch.empty((0,), dtype=torch.int64, device=dev)
            offsets = torch.searchsorted(sorted_key, torch.arange(K + 1, dtype=torch.int64, device=dev))
            _ema_segment_kernel[(K, triton.cdiv(D, cbd))](z, order, offsets, params, cluster_size, embed_avg, D,
                                                         BLOCK_R=_SEGMENT_ROWS, BLOCK_D=cbd)
        else:
            counts = torch.zeros((K,), dtype=torch.int32, device=dev)
            sums = torch.zeros((K, D), dtype=acc, device=dev)
            if N > 0:
                _ema_accumulate_kernel[(triton.cdiv(N, bm),)](z, indices, counts, sums, N, D, BLOCK_M=bm, BLOCK_D=bd)
            _ema_lerp_kernel[code_grid](counts, sums, params, cluster_size, embed_avg, K, D,
                                        BLOCK_K=_CODE_TILE, BLOCK_D=cbd)
        n = cluster_size.sum()
        denom = n + K * eps
        _ema_codebook_kernel[code_grid](cluster_size, embed_avg, params, n, denom, codebook, K, D,
                                        BLOCK_K=_CODE_TILE, BLOCK_D=cbd)


# ---------------------------------------------------------------------------
# Static description for vqfast.kernels_report (format: see nearest_code.py).
# ---------------------------------------------------------------------------

_ZDTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _kernel_variants():
    variants = []
    for zdt in _ZDTYPES:
        for buf in ("fp32", "fp64"):
            if zdt == "fp64" and buf == "fp32":
                continue
            bd = chunk_block(256, _TORCH[buf], False)
            bm, rbd = row_blocks(64, _TORCH[zdt], False)
            variants.append({
                "fn": "_ema_accumulate_kernel",
                "name": f"ema_accumulate[z {zdt},{buf},{bm}x{rbd}]",
                "signature": {"z_ptr": _ZDTYPES[zdt], "idx_ptr": "*i64", "counts_ptr": "*i32",
                              "sums_ptr": f"*{buf}", "N": "i32", "D": "i32",
                              "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
                "constexprs": {"BLOCK_M": bm, "BLOCK_D": rbd},
                "divisible_by_16": ["z_ptr", "idx_ptr", "counts_ptr", "sums_ptr", "D"],
                "num_warps": 4, "num_stages": 2,
            })
            variants.append({
                "fn": "_ema_segment_kernel",
                "name": f"ema_segment[z {zdt},{buf},{_SEGMENT_ROWS}x{bd}]",
                "signature": {"z_ptr": _ZDTYPES[zdt], "order_ptr": "*i64", "offsets_ptr": "*i64",
                              "params_ptr": f"*{buf}", "cs_ptr": f"*{buf}", "ea_ptr": f"*{buf}", "D": "i32",
                              "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                "constexprs": {"BLOCK_R": _SEGMENT_ROWS, "BLOCK_D": bd},
                "divisible_by_16": ["z_ptr", "order_ptr", "offsets_ptr", "params_ptr", "cs_ptr", "ea_ptr", "D"],
                "num_warps": 4, "num_stages": 2,
            })
        bm, rbd = row_blocks(64, _TORCH[zdt], False)
        variants.append({
            "fn": "_ema_keys_kernel",
            "name": f"ema_keys[z {zdt},{bm}x{rbd}]",
            "signature": {"z_ptr": _ZDTYPES[zdt], "idx_ptr": "*i64", "key_ptr": "*i64", "N": "i32", "D": "i32",
                          "K": "i32", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
            "constexprs": {"BLOCK_M": bm, "BLOCK_D": rbd},
            "divisible_by_16": ["z_ptr", "idx_ptr", "key_ptr", "D"],
            "num_warps": 4, "num_stages": 2,
        })
    for buf in ("fp32", "fp64"):
        bd = chunk_block(256, _TORCH[buf], False)
        variants.append({
            "fn": "_ema_lerp_kernel",
            "name": f"ema_lerp[{buf},{_CODE_TILE}x{bd}]",
            "signature": {"counts_ptr": "*i32", "sums_ptr": f"*{buf}", "params_ptr": f"*{buf}",
                          "cs_ptr": f"*{buf}", "ea_ptr": f"*{buf}", "K": "i32", "D": "i32",
                          "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"},
            "constexprs": {"BLOCK_K": _CODE_TILE, "BLOCK_D": bd},
            "divisible_by_16": ["counts_ptr", "sums_ptr", "params_ptr", "cs_ptr", "ea_ptr", "D"],
            "num_warps": 4, "num_stages": 2,
        })
        variants.append({
            "fn": "_ema_codebook_kernel",
            "name": f"ema_codebook[{buf},{_CODE_TILE}x{bd}]",
            "signature": {"cs_ptr": f"*{buf}", "ea_ptr": f"*{buf}", "params_ptr": f"*{buf}", "n_ptr": f"*{buf}",
                          "denom_ptr": f"*{buf}", "cb_ptr": f"*{buf}", "K": "i32", "D": "i32",
                          "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"},
            "constexprs": {"BLOCK_K": _CODE_TILE, "BLOCK_D": bd},
            "divisible_by_16": ["cs_ptr", "ea_ptr", "params_ptr", "n_ptr", "denom_ptr", "cb_ptr", "D"],
            "num_warps": 4, "num_stages": 2,
        })
    return variants


KERNELS = [dict(v, fn=globals()[v["fn"]]) for v in _kernel_variants()]
