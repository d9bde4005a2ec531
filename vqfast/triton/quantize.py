"""Fused quantize (forward and backward) in Triton.

Formulas: ``vqfast/reference/quantize.py``. Structure follows the C++ kernels
(csrc/cpu/quantize.cpp).

Forward, ``_quantize_forward_kernel``: one program per BLOCK_M rows runs the
nearest-code search of ``vqfast/triton/nearest_code.py`` (its ``_tile_dot`` /
``_merge_tile`` building blocks, same tie and NaN rules, same code term from
``_code_term_kernel``), and in its epilogue, while the row block is hot,
gathers each row's code into z_q (an exact copy for l2/dot, the unit code
e / max(||e||, eps) for cosine), writes the index, and writes the row's squared
error sum_d (z'_d - e'_d)^2 to a per-row buffer. The loss is then
``per_row.sum() / (N D)`` (torch.sum: a fixed-order reduction, deterministic,
and independent of the autotuned tile shape).

Backward:

* ``_quantize_backward_rows_kernel``, one program per BLOCK_M rows: grad_z.
  Passes over D (each only when needed; D-chunked, so any D works):
  (1) |z|^2 and |e|^2 (cosine or rotation); (2) |u + q|^2, u.g, q.g (rotation);
  (3) t.z' for the cosine chain; (4) t and the output. The arithmetic follows
  the reference operation for operation (divisions by the clamped norms, not
  multiplications by reciprocals), so exact cases stay exact: with D = 1,
  u = -q gives w = 0 as in the reference.
  In non-deterministic mode pass (4) also atomically adds the row's codebook
  contribution -(2 g_b / M)(z' - e') [+ g_q] into a (K, D) accumulation buffer.
* deterministic mode instead sorts the rows by code (torch.sort, stable, and
  torch.searchsorted for the segment offsets) and runs
  ``_codebook_grad_segment_kernel``: one program per (code, D chunk) that sums
  its rows' contributions tile by tile, in row order (bit-reproducible).
* ``_codebook_grad_finish_kernel`` applies J(e)^T per code (cosine) and casts
  to the codebook's dtype (needed for cosine, and for half inputs in atomic
  mode).

All sums are in float32 (float64 for float64 inputs). Row / code indices are
widened to int64 before they are multiplied by D; offsets inside one tile
stay int32 (the launcher checks BLOCK * D < 2**31). Outputs are poisoned (NaN,
index -1) before launch, so an unwritten row shows up.

On CUDA the forward is autotuned over tile shapes (keyed on K, D, metric and
dtype); the other kernels use fixed tile shapes scaled with D. On CPU tensors
(Triton interpreter, ``TRITON_INTERPRET=1`` set before triton is imported)
small fixed tiles are used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.triton.nearest_code import (_NO_INDEX, _NORM_EPS, _code_term_kernel, _inv_norm, _merge_tile, config_pruner,
                                        _tile_dot)

__all__ = ["quantize_forward_triton", "quantize_backward_triton", "KERNELS"]


# ---------------------------------------------------------------------------
# Small helpers (correctly rounded fp32 sqrt / division, like the C++ kernels)
# ---------------------------------------------------------------------------

_INTERPRET = bool(triton.knobs.runtime.interpret)


def device_fn(fn):
    """@triton.jit for a device helper; under the interpreter the plain function.

    Triton's interpreter (3.8) re-patches triton.language on every call of a
    nested @jit function (milliseconds each, per program and loop iteration),
    while a plain function called from an interpreted kernel runs the same
    tl.* calls, already patched for the kernel. Compiled kernels (the
    interpreter off) always get real @triton.jit helpers."""
    return fn if _INTERPRET else triton.jit(fn)


if _INTERPRET and hasattr(tl.standard, "_sum_combine"):
    # tl.sum is itself a @jit function: call the (patched, numpy) reduction directly.
    def _sum(x, axis):
        return tl.reduce(x, axis, tl.standard._sum_combine)
else:
    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.sum(x, axis=axis)


@device_fn
def _sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@device_fn
def _div(a, b):
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@device_fn
def _clamp_eps(n):
    return tl.where(n > _NORM_EPS, n, _NORM_EPS)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def _quantize_forward_kernel(z_ptr, cb_ptr, code_ptr, zq_ptr, idx_ptr, sq_ptr, N, K, D,
                             METRIC: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Search (as _nearest_code_kernel) + epilogue: z_q, indices, per-row squared error."""
    acc_ty: tl.constexpr = sq_ptr.dtype.element_ty
    pid = tl.program_id(0)
    row0 = pid * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    blk = row0.to(tl.int64) * D
    z_blk = z_ptr + blk
    z_off = offs_m[:, None] * D + offs_d[None, :]   # (BLOCK_M, BLOCK_D), int32 inside the block
    e_off = offs_n[None, :] * D + offs_d[:, None]   # (BLOCK_D, BLOCK_N)
    m_left = N - row0

    best_s = tl.full([BLOCK_M], float("inf"), dtype=acc_ty)
    best_i = tl.full([BLOCK_M], _NO_INDEX, dtype=tl.int32)
    zsq = tl.zeros([BLOCK_M], dtype=acc_ty)
    for n0 in range(0, K, BLOCK_N):
        cb_blk = cb_ptr + tl.cast(n0, tl.int64) * D
        acc, zsq = _tile_dot(z_blk, z_off, m_left, cb_blk, e_off, K - n0, D, acc_ty, IEEE,
                             METRIC != 2, n0 == 0, zsq, BLOCK_M, BLOCK_N, BLOCK_D)
        best_s, best_i = _merge_tile(acc, code_ptr, n0, K - n0, best_s, best_i, METRIC, BLOCK_N)
    best_i = tl.where(best_i == _NO_INDEX, 0, best_i)  # all-NaN row: index 0 (the search's rule)

    # Epilogue: gather the chosen codes, write z_q, accumulate the squared error.
    row_mask = offs_m < m_left
    e_rows = cb_ptr + best_i.to(tl.int64) * D         # (BLOCK_M,) 64-bit row pointers
    if METRIC == 1:
        zs = _inv_norm(zsq)                            # 1 / max(|z|, eps)
        es = tl.load(code_ptr + best_i, mask=row_mask, other=1.0)  # the code term: 1 / max(|e|, eps)
    zq_blk = zq_ptr + blk
    sq = tl.zeros([BLOCK_M], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        mask = row_mask[:, None] & (offs_d < D - d0)[None, :]
        zc = tl.load(z_blk + (z_off + d0), mask=mask, other=0.0).to(acc_ty)
        ec = tl.load(e_rows[:, None] + (offs_d[None, :] + d0), mask=mask, other=0.0)
        if METRIC == 1:
            ep = ec.to(acc_ty) * es[:, None]
            diff = zc * zs[:, None] - ep
            tl.store(zq_blk + (z_off + d0), ep.to(zq_ptr.dtype.element_ty), mask=mask)
        else:
            diff = zc - ec.to(acc_ty)
            tl.store(zq_blk + (z_off + d0), ec, mask=mask)  # the code, bit for bit
        sq += _sum(diff * diff, 1)
    rows = row0 + offs_m
    tl.store(idx_ptr + rows, best_i.to(tl.int64), mask=row_mask)
    tl.store(sq_ptr + rows, sq, mask=row_mask)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@device_fn
def _estimator_grad(z, e, g, nz, ne, zn, en, wn, ug, qg, c_scale, COSINE: tl.constexpr, ESTIMATOR: tl.constexpr):
    """(t, z', diff) for a (rows, D chunk) tile, as the reference computes them:
    z' = z / nz, e' = e / ne (cosine; nz, ne the clamped norms), diff = z' - e',
    t = T(g) + c_scale diff, where for the rotation u = z' / zn, q = e' / en,
    w = (u + q) / wn, T(g) = (g - 2 (w.g) w + 2 (q.g) u) (en / zn) and
    w.g = (u.g + q.g) / wn. Divisions, not reciprocals, like the reference, so
    exact cases stay exact (D = 1: u = -q gives w = 0)."""
    if COSINE:
        zp = _div(z, nz[:, None])
        ep = _div(e, ne[:, None])
    else:
        zp = z
        ep = e
    diff = zp - ep
    if ESTIMATOR == 1:
        u = _div(zp, zn[:, None])
        q = _div(ep, en[:, None])
        w = _div(u + q, wn[:, None])
        wg = _div(ug + qg, wn)
        t = (g - 2.0 * wg[:, None] * w + 2.0 * qg[:, None] * u) * _div(en, zn)[:, None]
    else:
        t = g
    return t + c_scale * diff, zp, diff


@triton.jit
def _quantize_backward_rows_kernel(gq_ptr, z_ptr, cb_ptr, idx_ptr, scale_ptr, gz_ptr, gcb_ptr, znorm_ptr, N, D,
                                   METRIC: tl.constexpr, ESTIMATOR: tl.constexpr, THROUGH: tl.constexpr,
                                   ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_z for BLOCK_M rows; with ATOMIC also the rows' codebook contributions
    (atomic adds into gcb_ptr, (K, D) in the accumulation dtype). Without ATOMIC
    and for cosine, writes each row's max(|z|, eps) to znorm_ptr for the segment
    kernel. scale_ptr: [2 g_c / M, -2 g_b / M] in the accumulation dtype."""
    acc_ty: tl.constexpr = scale_ptr.dtype.element_ty
    COSINE: tl.constexpr = METRIC == 1
    c_scale = tl.load(scale_ptr)
    b_scale = tl.load(scale_ptr + 1)
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N - row0
    blk = row0.to(tl.int64) * D
    off = offs_m[:, None] * D + offs_d[None, :]
    code = tl.load(idx_ptr + row0 + offs_m, mask=m_mask, other=0).to(tl.int64)
    e_off = code * D                                   # (BLOCK_M,) int64
    one = tl.full([BLOCK_M], 1.0, dtype=acc_ty)
    zero = tl.zeros([BLOCK_M], dtype=acc_ty)
    nz = one
    ne = one
    zn = one
    en = one
    wn = one
    ug = zero
    qg = zero

    # Pass 1: |z|^2, |e|^2.
    if COSINE or ESTIMATOR == 1:
        zz = zero
        ee = zero
        for d0 in range(0, D, BLOCK_D):
            mask = m_mask[:, None] & (offs_d < D - d0)[None, :]
            z = tl.load(z_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
            e = tl.load(cb_ptr + e_off[:, None] + (offs_d[None, :] + d0), mask=mask, other=0.0).to(acc_ty)
            zz += _sum(z * z, 1)
            ee += _sum(e * e, 1)
        if COSINE:
            nz = _clamp_eps(_sqrt(zz))
            ne = _clamp_eps(_sqrt(ee))
            zn = _clamp_eps(_div(_sqrt(zz), nz))   # |z'|, clamped
            en = _clamp_eps(_div(_sqrt(ee), ne))
        else:
            zn = _clamp_eps(_sqrt(zz))
            en = _clamp_eps(_sqrt(ee))
        if ESTIMATOR == 1:
            # Pass 2: |u + q|^2, u.g, q.g.
            uq = zero
            for d0 in range(0, D, BLOCK_D):
                mask = m_mask[:, None] & (offs_d < D - d0)[None, :]
                z = tl.load(z_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
                e = tl.load(cb_ptr + e_off[:, None] + (offs_d[None, :] + d0), mask=mask, other=0.0).to(acc_ty)
                g = tl.load(gq_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
                if COSINE:
                    z = _div(z, nz[:, None])
                    e = _div(e, ne[:, None])
                u = _div(z, zn[:, None])
                q = _div(e, en[:, None])
                v = u + q
                uq += _sum(v * v, 1)
                ug += _sum(u * g, 1)
                qg += _sum(q * g, 1)
            wn = _clamp_eps(_sqrt(uq))

    # Pass 3 (cosine): J(z)^T t = (t - [|z| > eps] (t.zh) zh) / nz with zh = z / nz = z'.
    if COSINE:
        tz = zero
        for d0 in range(0, D, BLOCK_D):
            mask = m_mask[:, None] & (offs_d < D - d0)[None, :]
            z = tl.load(z_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
            e = tl.load(cb_ptr + e_off[:, None] + (offs_d[None, :] + d0), mask=mask, other=0.0).to(acc_ty)
            g = tl.load(gq_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
            t, zp, diff = _estimator_grad(z, e, g, nz, ne, zn, en, wn, ug, qg, c_scale, COSINE, ESTIMATOR)
            tz += _sum(t * zp, 1)
        radial = tl.where(_sqrt(zz) > _NORM_EPS, tz, 0.0)
        if not ATOMIC:
            tl.store(znorm_ptr + row0 + offs_m, nz, mask=m_mask)

    # Pass 4: grad_z (and the atomic codebook contributions).
    for d0 in range(0, D, BLOCK_D):
        mask = m_mask[:, None] & (offs_d < D - d0)[None, :]
        z = tl.load(z_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
        e = tl.load(cb_ptr + e_off[:, None] + (offs_d[None, :] + d0), mask=mask, other=0.0).to(acc_ty)
        g = tl.load(gq_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
        t, zp, diff = _estimator_grad(z, e, g, nz, ne, zn, en, wn, ug, qg, c_scale, COSINE, ESTIMATOR)
        if COSINE:
            t = _div(t - radial[:, None] * zp, nz[:, None])
        tl.store(gz_ptr + blk + (off + d0), t.to(gz_ptr.dtype.element_ty), mask=mask)
        if ATOMIC:
            r = b_scale * diff
            if THROUGH:
                r += g
            tl.atomic_add(gcb_ptr + e_off[:, None] + (offs_d[None, :] + d0), r, mask=mask, sem="relaxed")


@triton.jit
def _codebook_grad_segment_kernel(gq_ptr, z_ptr, cb_ptr, order_ptr, offsets_ptr, znorm_ptr, scale_ptr, out_ptr, D,
                                  METRIC: tl.constexpr, THROUGH: tl.constexpr,
                                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Deterministic codebook gradient: program (k, c) sums, for code k and the
    c-th D chunk, -(2 g_b / M)(z'_i - e'_k) [+ g_q_i] over the code's rows in row
    order (order_ptr: rows sorted by code, stably; offsets_ptr: (K + 1,) segment
    starts), BLOCK_R rows at a time, and stores the sum (cast) to out_ptr."""
    acc_ty: tl.constexpr = scale_ptr.dtype.element_ty
    k = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    b_scale = tl.load(scale_ptr + 1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D - d0
    e_row = cb_ptr + k.to(tl.int64) * D
    e = tl.load(e_row + d0 + offs_d, mask=d_mask, other=0.0).to(acc_ty)
    if METRIC == 1:
        ee = tl.zeros([BLOCK_D], dtype=acc_ty)
        for c0 in range(0, D, BLOCK_D):
            ec = tl.load(e_row + c0 + offs_d, mask=offs_d < D - c0, other=0.0).to(acc_ty)
            ee += ec * ec
        e = _div(e, _clamp_eps(_sqrt(_sum(ee, 0))))
    start = tl.load(offsets_ptr + k).to(tl.int32)
    end = tl.load(offsets_ptr + k + 1).to(tl.int32)
    acc = tl.zeros([BLOCK_D], dtype=acc_ty)
    for r0 in range(start, end, BLOCK_R):
        r_mask = offs_r < end - r0
        rows = tl.load(order_ptr + r0 + offs_r, mask=r_mask, other=0).to(tl.int64)
        mask = r_mask[:, None] & d_mask[None, :]
        ptrs = rows[:, None] * D + (offs_d[None, :] + d0)
        z = tl.load(z_ptr + ptrs, mask=mask, other=0.0).to(acc_ty)
        if METRIC == 1:
            z = _div(z, tl.load(znorm_ptr + rows, mask=r_mask, other=1.0)[:, None])
        contrib = b_scale * (z - e[None, :])
        if THROUGH:
            contrib += tl.load(gq_ptr + ptrs, mask=mask, other=0.0).to(acc_ty)
        acc += _sum(tl.where(mask, contrib, 0.0), 0)
    tl.store(out_ptr + k.to(tl.int64) * D + d0 + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _codebook_grad_finish_kernel(buf_ptr, cb_ptr, out_ptr, K, D,
                                 COSINE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = J(e)^T buf per code (cosine) or buf, cast to out's dtype; buf in the accumulation dtype."""
    acc_ty: tl.constexpr = buf_ptr.dtype.element_ty
    k0 = tl.program_id(0) * BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_mask = offs_k < K - k0
    blk = k0.to(tl.int64) * D
    off = offs_k[:, None] * D + offs_d[None, :]
    if COSINE:
        ee = tl.zeros([BLOCK_K], dtype=acc_ty)
        ge = tl.zeros([BLOCK_K], dtype=acc_ty)
        for d0 in range(0, D, BLOCK_D):
            mask = k_mask[:, None] & (offs_d < D - d0)[None, :]
            e = tl.load(cb_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
            g = tl.load(buf_ptr + blk + (off + d0), mask=mask, other=0.0)
            ee += _sum(e * e, 1)
            ge += _sum(g * e, 1)
        ne = _clamp_eps(_sqrt(ee))
        # (g - [|e| > eps] (g.eh) eh) / ne with eh = e / ne, as the reference.
        radial = tl.where(_sqrt(ee) > _NORM_EPS, _div(ge, ne), 0.0)
    for d0 in range(0, D, BLOCK_D):
        mask = k_mask[:, None] & (offs_d < D - d0)[None, :]
        g = tl.load(buf_ptr + blk + (off + d0), mask=mask, other=0.0)
        if COSINE:
            e = tl.load(cb_ptr + blk + (off + d0), mask=mask, other=0.0).to(acc_ty)
            g = _div(g - radial[:, None] * _div(e, ne[:, None]), ne[:, None])
        tl.store(out_ptr + blk + (off + d0), g.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------

def _cfg(bm, bn, bd, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


# The forward's tiles: the search's (see nearest_code.py for why per dtype),
# a subset, since the epilogue holds a (BLOCK_M, BLOCK_D) tile more.
HALF_CONFIGS = [
    _cfg(64, 64, 32, 4, 3),
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 32, 4, 3),
    _cfg(32, 64, 32, 4, 2),
]
F32_CONFIGS = [
    _cfg(64, 64, 8, 8, 3),  # 4 warps spills (a little) on sm_90 with the epilogue
    _cfg(32, 64, 16, 4, 2),
    _cfg(64, 32, 16, 4, 2),
    _cfg(32, 32, 16, 4, 2),
]
F64_CONFIGS = [
    _cfg(64, 64, 8, 8, 2),  # 4 warps spills (a little) on sm_90 with the epilogue
    _cfg(32, 32, 16, 4, 2),
    _cfg(64, 32, 16, 4, 2),
]
GPU_CONFIGS = HALF_CONFIGS + F32_CONFIGS + F64_CONFIGS
_CONFIGS_FOR = {torch.float16: HALF_CONFIGS, torch.bfloat16: HALF_CONFIGS,
                torch.float32: F32_CONFIGS, torch.float64: F64_CONFIGS}

INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 32}
CODE_TERM_BLOCK = {"BLOCK_K": 32, "BLOCK_D": 64}
# Row / code tiles of the backward kernels: BLOCK_D = next power of two of D,
# clamped to [16, MAX_D]; rows so that a tile holds TILE elements.
_ROW_TILE = {"half": (128, 2048), "fp32": (128, 2048), "fp64": (64, 1024)}
_SEGMENT_ROWS = 32
_FINISH_CODES = 16
_MAX_BLOCK_ROWS = 256  # every BLOCK_M / BLOCK_N / BLOCK_R / BLOCK_K here is at most this


_prune_configs = config_pruner(_CONFIGS_FOR)


_quantize_forward_autotuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["K", "D", "METRIC"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_quantize_forward_kernel)


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp64" if dtype == torch.float64 else ("fp32" if dtype == torch.float32 else "half")


def row_blocks(D: int, dtype: torch.dtype, interp: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the row kernels (backward rows, EMA rows)."""
    if interp:
        return 32, min(64, max(16, triton.next_power_of_2(D)))
    max_d, tile = _ROW_TILE[_dtype_class(dtype)]
    bd = min(max_d, max(16, triton.next_power_of_2(D)))
    return max(16, tile // bd), bd


def chunk_block(D: int, dtype: torch.dtype, interp: bool) -> int:
    """BLOCK_D of the per-code kernels (dtype: the accumulation dtype)."""
    return min(64 if interp or dtype == torch.float64 else 128, max(16, triton.next_power_of_2(D)))


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def _kernels_are_interpreted() -> bool:
    return not isinstance(_quantize_forward_kernel, triton.runtime.JITFunction)


def _check_device(t: torch.Tensor, op: str) -> bool:
    """True when the kernels run under the interpreter (CPU tensors)."""
    if t.device.type == "cpu":
        if not _kernels_are_interpreted():
            raise RuntimeError(f"{op} on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                               "before triton is first imported")
        return True
    return _kernels_are_interpreted()


def _check_d(D: int, op: str) -> None:
    if D * _MAX_BLOCK_ROWS >= 2**31:
        raise ValueError(f"{op}: D={D} too large (in-tile offsets are int32)")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _nullcontext()


def quantize_forward_triton(z: torch.Tensor, codebook: torch.Tensor, metric: int):
    """(z_q, indices, commit_loss, codebook_loss) for contiguous z (N, D) and codebook (K, D)
    of one float dtype; metric 0 l2, 1 cosine, 2 dot. Losses: 0-d float32 (float64 for float64)."""
    metric = int(metric)
    if metric not in (0, 1, 2):
        raise ValueError(f"metric must be 0 (l2), 1 (cosine) or 2 (dot), got {metric}")
    z = z.contiguous()
    codebook = codebook.contiguous()
    N, D = z.shape
    K = codebook.shape[0]
    acc = _acc_dtype(z.dtype)
    zq = torch.full_like(z, float("nan"))
    idx = torch.full((N,), -1, dtype=torch.int64, device=z.device)
    if N == 0:
        zero = torch.zeros((), dtype=acc, device=z.device)
        return zq, idx, zero, zero.clone()
    interp = _check_device(z, "quantize_forward_triton")
    _check_d(D, "quantize_forward_triton")
    sq = torch.full((N,), float("nan"), dtype=acc, device=z.device)
    ieee = z.dtype == torch.float32
    with _device_ctx(z):
        if metric == 2:
            code = sq  # never read for the dot metric
        else:
            code = torch.empty((K,), dtype=acc, device=z.device)
            bk = CODE_TERM_BLOCK["BLOCK_K"]
            bd = min(CODE_TERM_BLOCK["BLOCK_D"], max(16, triton.next_power_of_2(D)))
            _code_term_kernel[(triton.cdiv(K, bk),)](codebook, code, K, D, METRIC=metric, BLOCK_K=bk, BLOCK_D=bd)
        if interp:
            cfg = INTERPRETER_CONFIG
            bd = min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(D)))
            _quantize_forward_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](
                z, codebook, code, zq, idx, sq, N, K, D, METRIC=metric, IEEE=ieee,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd)
        else:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
            _quantize_forward_autotuned[grid](z, codebook, code, zq, idx, sq, N, K, D, METRIC=metric, IEEE=ieee)
    loss = sq.sum() / (N * D)
    return zq, idx, loss, loss.clone()


def quantize_backward_triton(grad_zq: torch.Tensor, grad_commit: torch.Tensor, grad_codebook_loss: torch.Tensor,
                             z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: int,
                             estimator: int, through_output: bool, deterministic: bool):
    """(grad_z, grad_codebook): the reference's quantize_backward. deterministic: the
    codebook gradient is a sorted segment sum (fixed order) instead of atomic adds."""
    metric, estimator = int(metric), int(estimator)
    if metric not in (0, 1, 2):
        raise ValueError(f"metric must be 0 (l2), 1 (cosine) or 2 (dot), got {metric}")
    if estimator not in (0, 1):
        raise ValueError(f"estimator must be 0 (ste) or 1 (rotation), got {estimator}")
    z, codebook = z.contiguous(), codebook.contiguous()
    grad_zq, indices = grad_zq.to(z.dtype).contiguous(), indices.contiguous()
    N, D = z.shape
    K = codebook.shape[0]
    acc = _acc_dtype(z.dtype)
    if N == 0:
        return torch.empty_like(z), torch.zeros_like(codebook)
    interp = _check_device(z, "quantize_backward_triton")
    _check_d(D, "quantize_backward_triton")
    m = max(N * D, 1)
    # The reference's scalars, computed the same way (device ops: no host sync).
    scale = torch.stack([2.0 * grad_commit.to(acc) / m, -(2.0 * grad_codebook_loss.to(acc) / m)]).contiguous()
    cosine = metric == 1
    atomic = not deterministic
    grad_z = torch.full_like(z, float("nan"))
    grad_cb = torch.full_like(codebook, float("nan"))
    bm, bd = row_blocks(D, z.dtype, interp)
    cbd = chunk_block(D, acc, interp)
    with _device_ctx(z):
        if atomic:
            buf = torch.zeros((K, D), dtype=acc, device=z.device)
            znorm = buf  # unused
        else:
            buf = None
            znorm = torch.full((N,), float("nan"), dtype=acc, device=z.device) if cosine else scale
        _quantize_backward_rows_kernel[(triton.cdiv(N, bm),)](
            grad_zq, z, codebook, indices, scale, grad_z, buf if atomic else scale, znorm, N, D,
            METRIC=metric, ESTIMATOR=estimator, THROUGH=bool(through_output), ATOMIC=atomic,
            BLOCK_M=bm, BLOCK_D=bd)
        if not atomic:
            sorted_idx, order = torch.sort(indices, stable=True)
            offsets = torch.searchsorted(sorted_idx, torch.arange(K + 1, device=z.device, dtype=torch.int64))
            # Cosine sums into an accumulation-dtype buffer (the finish kernel
            # chains J(e)^T); otherwise straight into grad_cb (cast on store).
            if cosine:
                buf = torch.full((K, D), float("nan"), dtype=acc, device=z.device)
            seg_out = buf if cosine else grad_cb
            _codebook_grad_segment_kernel[(K, triton.cdiv(D, cbd))](
                grad_zq, z, codebook, order, offsets, znorm, scale, seg_out, D,
                METRIC=metric, THROUGH=bool(through_output), BLOCK_R=_SEGMENT_ROWS, BLOCK_D=cbd)
            if not cosine:
                return grad_z, grad_cb
        elif not cosine and codebook.dtype == acc:
            return grad_z, buf
        _codebook_grad_finish_kernel[(triton.cdiv(K, _FINISH_CODES),)](
            buf, codebook, grad_cb, K, D, COSINE=cosine, BLOCK_K=_FINISH_CODES, BLOCK_D=cbd)
    return grad_z, grad_cb


# ---------------------------------------------------------------------------
# Static description for vqfast.kernels_report (same format as nearest_code.py):
# each entry: fn, name, signature, constexprs, divisible_by_16, num_warps,
# num_stages, and optionally sweep=True (skipped by `kernels_report --quick`).
# ---------------------------------------------------------------------------

_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
_CONFIGS_BY_NAME = {"fp16": HALF_CONFIGS, "bf16": HALF_CONFIGS, "fp32": F32_CONFIGS, "fp64": F64_CONFIGS}
_METRICS = {0: "l2", 1: "cosine", 2: "dot"}
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _acc_ptr(dt):
    return "*fp64" if dt == "fp64" else "*fp32"


def _forward_variant(dt, metric, c, aligned):
    k = c.kwargs
    ptrs = ["z_ptr", "cb_ptr", "code_ptr", "zq_ptr", "idx_ptr", "sq_ptr"]
    return {
        "fn": "_quantize_forward_kernel",
        "name": f"quantize_forward[{dt},{_METRICS[metric]},{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_D']},"
                f"w{c.num_warps}s{c.num_stages},{'D%16=0' if aligned else 'D%16!=0'}]",
        "signature": {"z_ptr": _DTYPES[dt], "cb_ptr": _DTYPES[dt], "code_ptr": _acc_ptr(dt), "zq_ptr": _DTYPES[dt],
                      "idx_ptr": "*i64", "sq_ptr": _acc_ptr(dt), "N": "i32", "K": "i32", "D": "i32",
                      "METRIC": "constexpr", "IEEE": "constexpr",
                      "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
        "constexprs": {"METRIC": metric, "IEEE": dt == "fp32", **k},
        "divisible_by_16": ptrs + (["D"] if aligned else []),
        "num_warps": c.num_warps, "num_stages": c.num_stages,
    }


def _rows_variant(dt, metric, estimator, atomic, D):
    bm, bd = row_blocks(D, _TORCH_DTYPE[dt], False)
    acc = _acc_ptr(dt)
    return {
        "fn": "_quantize_backward_rows_kernel",
        "name": f"quantize_backward_rows[{dt},{_METRICS[metric]},{'rotation' if estimator else 'ste'},"
                f"{'atomic' if atomic else 'sorted'},{bm}x{bd}]",
        "signature": {"gq_ptr": _DTYPES[dt], "z_ptr": _DTYPES[dt], "cb_ptr": _DTYPES[dt], "idx_ptr": "*i64",
                      "scale_ptr": acc, "gz_ptr": _DTYPES[dt], "gcb_ptr": acc, "znorm_ptr": acc,
                      "N": "i32", "D": "i32", "METRIC": "constexpr", "ESTIMATOR": "constexpr",
                      "THROUGH": "constexpr", "ATOMIC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
        "constexprs": {"METRIC": metric, "ESTIMATOR": estimator, "THROUGH": True, "ATOMIC": atomic,
                       "BLOCK_M": bm, "BLOCK_D": bd},
        "divisible_by_16": ["gq_ptr", "z_ptr", "cb_ptr", "idx_ptr", "scale_ptr", "gz_ptr", "gcb_ptr", "znorm_ptr",
                            "D"],
        "num_warps": 4, "num_stages": 2,
    }


def _kernel_variants():
    variants = []
    for dt in _DTYPES:
        for m in _METRICS:
            variants.append(_forward_variant(dt, m, _CONFIGS_BY_NAME[dt][0], True))
    for dt in ("fp16", "fp32", "fp64"):
        for i, c in enumerate(_CONFIGS_BY_NAME[dt]):
            for aligned in (True, False):
                if i == 0 and aligned:
                    continue
                for m in (0, 1):  # l2: the search's heaviest; cosine: the epilogue's
                    variants.append(dict(_forward_variant(dt, m, c, aligned), sweep=i > 0))
    # Backward rows: the heaviest combination (cosine + rotation) at each dtype and
    # two tile shapes (D = 64 and D >= 128), both codebook modes; the rest at D = 64.
    for dt in _DTYPES:
        for atomic in (True, False):
            variants.append(_rows_variant(dt, 1, 1, atomic, 64))
            if row_blocks(256, _TORCH_DTYPE[dt], False) != row_blocks(64, _TORCH_DTYPE[dt], False):
                variants.append(dict(_rows_variant(dt, 1, 1, atomic, 256), sweep=True))
        for m, est in ((0, 0), (0, 1), (2, 0), (1, 0)):
            variants.append(dict(_rows_variant(dt, m, est, True, 64), sweep=dt == "bf16"))
    for dt in _DTYPES:
        acc = _acc_ptr(dt)
        bd = chunk_block(256, _TORCH_DTYPE[dt], False)
        for m in (0, 1):
            variants.append({
                "fn": "_codebook_grad_segment_kernel",
                "name": f"codebook_grad_segment[{dt},{_METRICS[m]},{_SEGMENT_ROWS}x{bd}]",
                "signature": {"gq_ptr": _DTYPES[dt], "z_ptr": _DTYPES[dt], "cb_ptr": _DTYPES[dt],
                              "order_ptr": "*i64", "offsets_ptr": "*i64", "znorm_ptr": acc, "scale_ptr": acc,
                              "out_ptr": acc if m == 1 else _DTYPES[dt], "D": "i32",
                              "METRIC": "constexpr", "THROUGH": "constexpr",
                              "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
                "constexprs": {"METRIC": m, "THROUGH": True, "BLOCK_R": _SEGMENT_ROWS, "BLOCK_D": bd},
                "divisible_by_16": ["gq_ptr", "z_ptr", "cb_ptr", "order_ptr", "offsets_ptr", "znorm_ptr",
                                    "scale_ptr", "out_ptr", "D"],
                "num_warps": 4, "num_stages": 2,
            })
        for cos in (True, False):
            variants.append({
                "fn": "_codebook_grad_finish_kernel",
                "name": f"codebook_grad_finish[{dt},{'cosine' if cos else 'cast'},{_FINISH_CODES}x{bd}]",
                "signature": {"buf_ptr": acc, "cb_ptr": _DTYPES[dt], "out_ptr": _DTYPES[dt], "K": "i32",
                              "D": "i32", "COSINE": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"},
                "constexprs": {"COSINE": cos, "BLOCK_K": _FINISH_CODES, "BLOCK_D": bd},
                "divisible_by_16": ["buf_ptr", "cb_ptr", "out_ptr", "D"],
                "num_warps": 4, "num_stages": 2,
            })
    return variants


KERNELS = [dict(v, fn=globals()[v["fn"]]) for v in _kernel_variants()]
