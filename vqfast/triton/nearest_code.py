"""Fused nearest-codebook search in Triton.

For z (N, D) and a codebook (K, D) this returns, per row, the index of the
closest code and its distance, without ever materialising the N x K distance
matrix. The arithmetic follows csrc/common/distance.h exactly in structure:

  l2:     score = |e|^2 - 2 z.e          distance = max(score + |z|^2, 0)
  cosine: score = -(z.e) / max(|e|,eps)  distance = 1 + score / max(|z|,eps)
  dot:    score = -(z.e)                 distance = score

The per-row term never enters the inner loop (it cannot change the argmin);
the per-code term (|e|^2, or 1/max(|e|,eps)) is computed once per call into a
K-vector by ``_code_term_kernel``, exactly like ``code_term`` in the C++
kernels. Ties go to the lowest code index (as ``torch.argmin``); a NaN score
never beats a number, and a row whose scores are all NaN gets index 0 (and a
NaN distance).

Design of ``_nearest_code_kernel``: one program per BLOCK_M rows; it walks the
codebook in BLOCK_N tiles, accumulating the BLOCK_M x BLOCK_N dot products
with ``tl.dot`` over D in BLOCK_D chunks (fp32 accumulation for fp16/bf16/fp32,
fp64 for fp64; fp32 inputs use ``input_precision="ieee"`` so TF32 rounding can
never change the argmin), turns the tile into scores, takes the tile's min and
the first index attaining it, and merges into the running best with strict
``<`` (later tiles hold larger indices, so this keeps the lowest-index tie
rule). The row's squared norm is accumulated from the z chunks loaded for the
first code tile (a uniform branch inside the D loop; later tiles skip it).

On CUDA the kernel is autotuned over tile shapes, keyed on (K, D, metric) and
the input dtype. On CPU tensors (Triton interpreter, ``TRITON_INTERPRET=1`` set
before triton is imported) one small fixed config is launched instead.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["nearest_code_triton", "KERNELS"]

# Sentinel "no code yet" index inside the kernel (code indices are < K < 2**31),
# and the norm floor of csrc/common/distance.h (kNormEps).
_NO_INDEX = tl.constexpr(2147483647)
_NORM_EPS = tl.constexpr(1e-12)

# Under Triton's interpreter (3.8) tl.dot is np.matmul, which is wrong for
# bfloat16 (stored as raw uint16, fed to matmul as integers) and, through BLAS
# micro-kernels, can give *different* results for identical codebook columns,
# which breaks the lowest-index tie rule. Interpreted kernels therefore form the
# chunk's dot products as a broadcast product summed over D in the accumulation
# dtype (np.sum over a non-contiguous axis adds in the same order for every
# output, so identical codes tie exactly). Compiled kernels (this is False)
# always use tl.dot.
_INTERPRETER = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _inv_norm(sq):
    """1 / max(sqrt(sq), eps), correctly rounded (sqrt.rn / div.rn, as the C++
    kernels compile them), in sq's dtype."""
    if sq.dtype == tl.float64:
        n = tl.sqrt(sq)  # fp64 sqrt and division are always IEEE-rounded
        return 1.0 / tl.where(n > _NORM_EPS, n, _NORM_EPS)
    else:
        n = tl.sqrt_rn(sq)
        return tl.math.div_rn(tl.full(sq.shape, 1.0, tl.float32), tl.where(n > _NORM_EPS, n, _NORM_EPS))


@triton.jit
def _code_term_kernel(cb_ptr, out_ptr, K, D,
                      METRIC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[k] = |e_k|^2 (l2) or 1/max(|e_k|, eps) (cosine), in out's dtype."""
    acc_ty: tl.constexpr = out_ptr.dtype.element_ty
    row0 = tl.program_id(0) * BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    blk = cb_ptr + row0.to(tl.int64) * D  # 64-bit block base, int32 offsets inside it
    off = offs_k[:, None] * D + offs_d[None, :]
    k_mask = (offs_k < K - row0)[:, None]
    sq2 = tl.zeros([BLOCK_K, BLOCK_D], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        e = tl.load(blk + (off + d0), mask=k_mask & (offs_d < D - d0)[None, :], other=0.0).to(acc_ty)
        sq2 += e * e
    sq = tl.sum(sq2, axis=1)
    if METRIC == 0:
        term = sq
    else:
        term = _inv_norm(sq)
    tl.store(out_ptr + row0 + offs_k, term, mask=offs_k < K - row0)


@triton.jit
def _tile_dot(z_blk, z_off, m_left, cb_blk, e_off, n_left, D,
              acc_ty: tl.constexpr, IEEE: tl.constexpr, WITH_NORM: tl.constexpr, first, zsq,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) dot products z.e for one code tile; on the first tile
    (`first`, and WITH_NORM) also adds the rows' squared norms, from the same z
    chunks, into zsq. Returns (acc, zsq).

    z_blk / cb_blk: scalar pointers to the first row of the row block / code
    tile (formed in 64 bits); z_off (BLOCK_M, BLOCK_D) and e_off (BLOCK_D,
    BLOCK_N): int32 offsets inside the block; m_left / n_left: rows / codes
    left from the block's first one (for the masks)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = (offs_m < m_left)[:, None]
    n_mask = (offs_n < n_left)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        d_left = D - d0
        zc = tl.load(z_blk + (z_off + d0), mask=m_mask & (offs_d < d_left)[None, :], other=0.0)
        ec = tl.load(cb_blk + (e_off + d0), mask=(offs_d < d_left)[:, None] & n_mask, other=0.0)
        if _INTERPRETER:
            acc += tl.sum(zc.to(acc_ty)[:, :, None] * ec.to(acc_ty)[None, :, :], axis=1)
        elif IEEE:
            acc = tl.dot(zc, ec, acc, input_precision="ieee", out_dtype=acc_ty)
        else:
            acc = tl.dot(zc, ec, acc, out_dtype=acc_ty)
        if WITH_NORM:
            if first:
                zf = zc.to(acc_ty)
                zsq += tl.sum(zf * zf, axis=1)
    return acc, zsq


@triton.jit
def _merge_tile(acc, code_ptr, n0, n_left, best_s, best_i,
                METRIC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores for the code tile starting at n0, merged into the running (best_s, best_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_left
    # Codes past K get a NaN score (via a NaN code term), so they are never chosen.
    if METRIC == 0:
        code = tl.load(code_ptr + n0 + offs_n, mask=n_mask, other=float("nan"))
        score = code[None, :] - 2.0 * acc
    elif METRIC == 1:
        code = tl.load(code_ptr + n0 + offs_n, mask=n_mask, other=float("nan"))
        score = -acc * code[None, :]
    else:
        pen = tl.where(n_mask, 0.0, float("nan")).to(acc.dtype)
        score = pen[None, :] - acc
    # NaN loses to every number (+inf included): exclude NaNs from the min, and
    # `score == tile_min` is false for them, so they are never a candidate index.
    clean = tl.where(score == score, score, float("inf"))
    tile_min = tl.min(clean, axis=1)
    local = tl.min(tl.where(score == tile_min[:, None], offs_n[None, :], _NO_INDEX), axis=1)
    found = local != _NO_INDEX
    # Strict < keeps the earlier (lower) index on ties; the second clause takes a
    # tile whose best is +inf when nothing non-NaN has been seen yet.
    upd = (tile_min < best_s) | ((best_i == _NO_INDEX) & found)
    best_s = tl.where(upd, tile_min, best_s)
    best_i = tl.where(upd, local + n0, best_i)
    return best_s, best_i


@triton.jit
def _nearest_code_kernel(z_ptr, cb_ptr, code_ptr, idx_ptr, dist_ptr, N, K, D,
                         METRIC: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Accumulation dtype = output distance dtype (fp32, or fp64 for fp64 input).
    acc_ty: tl.constexpr = dist_ptr.dtype.element_ty
    pid = tl.program_id(0)
    row0 = pid * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit where it matters: the block's first row / code index is widened
    # before multiplying by the row stride (N*D and K*D can pass 2**31); offsets
    # inside a block (< BLOCK * D) stay int32, which keeps per-element address
    # registers down. The launcher checks BLOCK * D < 2**31.
    z_blk = z_ptr + row0.to(tl.int64) * D
    z_off = offs_m[:, None] * D + offs_d[None, :]   # (BLOCK_M, BLOCK_D)
    e_off = offs_n[None, :] * D + offs_d[:, None]   # (BLOCK_D, BLOCK_N), same for every tile
    m_left = N - row0

    best_s = tl.full([BLOCK_M], float("inf"), dtype=acc_ty)
    best_i = tl.full([BLOCK_M], _NO_INDEX, dtype=tl.int32)

    # |z|^2 is accumulated from the z chunks the first code tile loads anyway (a
    # uniform runtime branch; peeling the first tile instead doubles the loop
    # body and made ptxas spill at 64x64x32 on sm_80).
    zsq = tl.zeros([BLOCK_M], dtype=acc_ty)
    for n0 in range(0, K, BLOCK_N):
        cb_blk = cb_ptr + tl.cast(n0, tl.int64) * D
        acc, zsq = _tile_dot(z_blk, z_off, m_left, cb_blk, e_off, K - n0, D, acc_ty, IEEE,
                             METRIC != 2, n0 == 0, zsq, BLOCK_M, BLOCK_N, BLOCK_D)
        best_s, best_i = _merge_tile(acc, code_ptr, n0, K - n0, best_s, best_i, METRIC, BLOCK_N)

    # A row with only NaN scores: index 0 and a NaN distance (as the C++ rule).
    none = best_i == _NO_INDEX
    best_i = tl.where(none, 0, best_i)
    best_s = tl.where(none, float("nan"), best_s)
    if METRIC == 0:
        dist = best_s + zsq
        dist = tl.where(dist < 0.0, 0.0, dist)  # not maximum(): NaN must stay NaN
    elif METRIC == 1:
        dist = 1.0 + best_s * _inv_norm(zsq)
    else:
        dist = best_s
    rows = row0 + offs_m
    row_mask = offs_m < m_left
    tl.store(idx_ptr + rows, best_i.to(tl.int64), mask=row_mask)
    tl.store(dist_ptr + rows, dist.to(acc_ty), mask=row_mask)


# ---------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------

def _cfg(bm, bn, bd, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd},
                         num_warps=warps, num_stages=stages)


# Per input dtype, because the dot lowers differently: fp16/bf16 -> HMMA (sm_80)
# / HGMMA (sm_90) tensor cores; fp32 with input_precision="ieee" -> an FMA loop
# whose operands sit in registers (so BLOCK_D must stay small: 64x64x32 spills);
# fp64 -> DMMA. Every config here compiles without spills for sm_80 and sm_90,
# with D a multiple of 16 and without (python -m vqfast.kernels_report checks).
HALF_CONFIGS = [
    _cfg(64, 64, 32, 4, 3),
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 32, 4, 3),
    _cfg(128, 64, 32, 4, 3),
    _cfg(64, 64, 64, 4, 3),
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 64, 8, 3),
    _cfg(32, 64, 32, 4, 2),
    _cfg(64, 64, 16, 4, 2),
    _cfg(128, 128, 16, 8, 2),
]
F32_CONFIGS = [
    _cfg(64, 64, 8, 4, 3),
    _cfg(32, 64, 16, 4, 2),
    _cfg(64, 32, 16, 4, 2),
    _cfg(128, 64, 8, 8, 2),
    _cfg(64, 128, 8, 8, 2),
    _cfg(32, 32, 16, 4, 2),
]
F64_CONFIGS = [
    _cfg(64, 64, 8, 4, 2),
    _cfg(32, 32, 16, 4, 2),
    _cfg(64, 32, 16, 4, 2),
    _cfg(32, 64, 16, 4, 2),
    _cfg(64, 64, 16, 4, 2),
]
GPU_CONFIGS = HALF_CONFIGS + F32_CONFIGS + F64_CONFIGS
_CONFIGS_FOR = {torch.float16: HALF_CONFIGS, torch.bfloat16: HALF_CONFIGS,
                torch.float32: F32_CONFIGS, torch.float64: F64_CONFIGS}

# The interpreter runs every program in Python: keep tiles small.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 32}
CODE_TERM_BLOCK = {"BLOCK_K": 32, "BLOCK_D": 64}
# In-block offsets are int32: BLOCK_M*D and BLOCK_N*D must stay below 2**31.
_MAX_BLOCK_ROWS = max(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in GPU_CONFIGS)


def config_pruner(configs_for):
    """An autotune pruner keeping the input dtype's configs (``configs_for[z.dtype]``),
    without BLOCK_D wider than D needs."""
    def prune(configs, named_args, **kwargs):
        D = named_args["D"]
        mine = {id(c) for c in configs_for[named_args["z_ptr"].dtype]}
        mine = [c for c in configs if id(c) in mine]
        dmax = max(16, triton.next_power_of_2(D))
        fit = [c for c in mine if c.kwargs["BLOCK_D"] <= dmax]
        return fit or [min(mine, key=lambda c: c.kwargs["BLOCK_D"])]

    return prune


_prune_configs = config_pruner(_CONFIGS_FOR)


_nearest_code_autotuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["K", "D", "METRIC"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_nearest_code_kernel)


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def _interpreting(z: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" or z.device.type == "cpu"


def _kernels_are_interpreted() -> bool:
    return not isinstance(_nearest_code_kernel, triton.runtime.JITFunction)


def nearest_code_triton(z: torch.Tensor, codebook: torch.Tensor, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, (N,)) and distances ((N,), float32; float64 for float64
    input) of the nearest code to each row of z. metric: 0 l2, 1 cosine, 2 dot."""
    metric = int(metric)
    if metric not in (0, 1, 2):
        raise ValueError(f"metric must be 0 (l2), 1 (cosine) or 2 (dot), got {metric}")
    N, D = z.shape
    K = codebook.shape[0]
    acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    # Poisoned: the kernel must write every row.
    indices = torch.full((N,), -1, dtype=torch.int64, device=z.device)
    distances = torch.full((N,), float("nan"), dtype=acc_dtype, device=z.device)
    if N == 0:
        return indices, distances

    interp = _interpreting(z)
    if z.device.type == "cpu" and not _kernels_are_interpreted():
        raise RuntimeError("nearest_code_triton on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")
    ieee = z.dtype == torch.float32
    if D * _MAX_BLOCK_ROWS >= 2**31:
        raise ValueError(f"nearest_code_triton: D={D} too large (in-block offsets are int32)")

    with torch.cuda.device(z.device) if z.device.type == "cuda" else _nullcontext():
        if metric == 2:
            code = distances  # never read for the dot metric
        else:
            code = torch.empty((K,), dtype=acc_dtype, device=z.device)
            bk = CODE_TERM_BLOCK["BLOCK_K"]
            bd = min(CODE_TERM_BLOCK["BLOCK_D"], max(16, triton.next_power_of_2(D)))
            _code_term_kernel[(triton.cdiv(K, bk),)](codebook, code, K, D, METRIC=metric,
                                                     BLOCK_K=bk, BLOCK_D=bd)
        if interp:
            cfg = INTERPRETER_CONFIG
            bd = min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(D)))
            _nearest_code_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](
                z, codebook, code, indices, distances, N, K, D, METRIC=metric, IEEE=ieee,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd)
        else:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
            _nearest_code_autotuned[grid](z, codebook, code, indices, distances, N, K, D,
                                          METRIC=metric, IEEE=ieee)
    return indices, distances


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------
# Static description for vqfast.kernels_report: each jit kernel with the
# signatures / constexprs worth compiling ahead of time (no GPU needed).
# ---------------------------------------------------------------------------

_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
_CONFIGS_BY_NAME = {"fp16": HALF_CONFIGS, "bf16": HALF_CONFIGS, "fp32": F32_CONFIGS, "fp64": F64_CONFIGS}
_METRICS = {0: "l2", 1: "cosine", 2: "dot"}
# Triton specialises at launch on 16-divisibility of pointers and ints: D % 16 == 0
# (aligned, vectorised loads, cp.async pipelining) and D % 16 != 0 are different
# binaries. torch allocations are 16-byte aligned, so the pointers always are.
_ALIGNED = ["z_ptr", "cb_ptr", "code_ptr", "idx_ptr", "dist_ptr", "D"]
_UNALIGNED = ["z_ptr", "cb_ptr", "code_ptr", "idx_ptr", "dist_ptr"]


def _main_signature(dt):
    acc = "*fp64" if dt == "fp64" else "*fp32"
    return {"z_ptr": _DTYPES[dt], "cb_ptr": _DTYPES[dt], "code_ptr": acc, "idx_ptr": "*i64",
            "dist_ptr": acc, "N": "i32", "K": "i32", "D": "i32",
            "METRIC": "constexpr", "IEEE": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}


def _main_variant(dt, metric, c, aligned):
    k = c.kwargs
    return {
        "fn": "_nearest_code_kernel",
        "name": f"nearest_code[{dt},{_METRICS[metric]},{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_D']},"
                f"w{c.num_warps}s{c.num_stages},{'D%16=0' if aligned else 'D%16!=0'}]",
        "signature": _main_signature(dt),
        "constexprs": {"METRIC": metric, "IEEE": dt == "fp32", **k},
        "divisible_by_16": _ALIGNED if aligned else _UNALIGNED,
        "num_warps": c.num_warps, "num_stages": c.num_stages,
    }


def _kernel_variants():
    variants = []
    # Every metric and dtype at each dtype's first (default) config, D % 16 == 0.
    for dt in _DTYPES:
        for m in _METRICS:
            variants.append(_main_variant(dt, m, _CONFIGS_BY_NAME[dt][0], True))
    # Every autotune config for l2 (the metric with the most live registers),
    # both specialisations; bf16 compiles like fp16.
    for dt in ("fp16", "fp32", "fp64"):
        for i, c in enumerate(_CONFIGS_BY_NAME[dt]):
            for aligned in (True, False):
                if i == 0 and aligned:
                    continue  # already listed above
                # sweep: the report's --quick mode skips these
                variants.append(dict(_main_variant(dt, 0, c, aligned), sweep=i > 0))
    for dt in _DTYPES:
        acc = "*fp64" if dt == "fp64" else "*fp32"
        for m in (0, 1):
            variants.append({
                "fn": "_code_term_kernel",
                "name": f"code_term[{dt},{_METRICS[m]}]",
                "signature": {"cb_ptr": _DTYPES[dt], "out_ptr": acc, "K": "i32", "D": "i32",
                              "METRIC": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr"},
                "constexprs": {"METRIC": m, **CODE_TERM_BLOCK},
                "divisible_by_16": ["cb_ptr", "out_ptr", "D"],
                "num_warps": 4, "num_stages": 2,
            })
    return variants


# Each entry: fn (the @triton.jit kernel), name, signature (for ASTSource),
# constexprs, divisible_by_16 (argument names Triton may assume 16-divisible /
# 16-byte aligned, as its launch-time specialisation does), num_warps,
# num_stages, and optionally sweep=True (a non-default autotune config, skipped
# by `kernels_report --quick`). Consumed by vqfast.kernels_report.
KERNELS = [dict(v, fn=globals()[v["fn"]]) for v in _kernel_variants()]
