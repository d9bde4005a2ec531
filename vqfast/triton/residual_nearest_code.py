"""Fused multi-stage (residual) nearest-code search in Triton.

For z (N, D) and codebooks (Q, K, D), stage q picks the code of codebooks[q]
nearest to the residual r_q (r_0 = z, r_{q+1} = r_q - codebooks[q][i_q]), with
the metrics, the score / distance split, the NaN rule and the lowest-index tie
rule of ``vqfast/triton/nearest_code.py`` (whose ``_merge_tile``, ``_inv_norm``
and ``_code_term_kernel`` are used as they are). Returns indices int64 (N, Q)
and the distance of r_q to its chosen code, (N, Q) in the accumulation dtype.
The formulas are in ``vqfast/reference/residual.py``.

Design of ``_residual_nearest_code_kernel`` (D <= MAX_RESIDENT_D = 256): one
program owns BLOCK_M rows for *all* Q stages. The residual tile, BLOCK_M x
BLOCK_D with BLOCK_D = next_pow2(D) covering the whole row, is loaded once from
z, converted to the accumulation dtype (fp32; fp64 for fp64) and then lives in
registers until the program ends: per stage the program sweeps codebooks[q] in
BLOCK_N tiles (one ``tl.dot`` of the resident residual with the whole-D code
tile per tile, then ``_merge_tile``'s running best), finishes the stage's
distance from |r_q|^2 (a row sum of the resident tile, no reload), gathers the
chosen codes (one row each, an L2 hit: the stage just swept them) and
subtracts them on chip. z is read once, the outputs written once; nothing else
goes through memory between stages. Triton cannot slice a register tensor, so
the residual must be one tile: hence the D bound.

The residual is fp32 while the codes may be fp16/bf16, so the dot is always
taken in the accumulation dtype:
  * fp32 input: ``input_precision="ieee"`` (FMA), as nearest_code, so a TF32
    rounding can never reorder near ties against the reference;
  * fp16 / bf16 input, BLOCK_D <= 32: ``"tf32x3"`` tensor cores (three TF32
    MMAs, the split hi/lo product), accurate to about 2^-22 relative, i.e.
    fp32-like. At stage 0 it is exact (a half value fits in TF32 and the
    products in fp32); the fp32 residual of later stages has no half
    representation, so a plain fp16/bf16 MMA would round it to 8-11 bits and
    change the search. From BLOCK_D 64 the tf32x3 operands (hi and lo halves
    of both tiles, held in registers) spill even at the smallest tile (sm_80
    at 128, sm_90 at 64 with D % 16 != 0), so those widths take the FMA dot,
    as fp32;
  * fp64: fp64 dot (DMMA on sm_80+).

D > 256: a documented fallback, a loop of per-stage launches of the
single-stage Triton search (``nearest_code_triton``) on the fp32 (fp64)
residual against codebooks[q] in the accumulation dtype (exact conversion),
with the residual updated by torch between launches. Same numerics and tie
rule; Q launches and Q round trips of the residual through memory.

On CUDA the resident kernel is autotuned over (BLOCK_M, BLOCK_N, warps, stages)
keyed on (Q, K, D, METRIC) and the dtype; configs too large for BLOCK_D are
pruned (register budget). On CPU tensors (Triton interpreter,
``TRITON_INTERPRET=1`` set before triton is imported) one small fixed config is
launched, and the dot is a broadcast product summed over D in the accumulation
dtype (see ``_INTERPRETER`` in nearest_code.py for why).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.triton.nearest_code import (_INTERPRETER, _NO_INDEX, CODE_TERM_BLOCK, _code_term_kernel, _inv_norm,
                                        _interpreting, _kernels_are_interpreted, _merge_tile, _nullcontext,
                                        nearest_code_triton)

__all__ = ["residual_nearest_code_triton", "KERNELS", "MAX_RESIDENT_D"]

# Widest D whose residual tile stays resident (BLOCK_D = next_pow2(D)).
MAX_RESIDENT_D = 256

# How the stage dot is taken (a constexpr of the kernel).
_DOT_IEEE = 0    # fp32 operands, FMA (fp32 input)
_DOT_TF32X3 = 1  # fp32 operands, 3xTF32 tensor cores (fp16 / bf16 input)
_DOT_NATIVE = 2  # fp64 operands (fp64 input)


@triton.jit
def _residual_nearest_code_kernel(z_ptr, cb_ptr, code_ptr, idx_ptr, dist_ptr, N, Q, K, D,
                                  METRIC: tl.constexpr, DOT: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_ty: tl.constexpr = dist_ptr.dtype.element_ty
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_left = N - row0
    m_mask = offs_m < m_left
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    # 64-bit block bases (row0 * D, q * K * D and n0 * D pass 2**31 at real
    # sizes); in-block offsets stay int32 (the launcher checks BLOCK * D < 2**31).
    z_blk = z_ptr + row0.to(tl.int64) * D
    e_off = offs_n[None, :] * D + offs_d[:, None]  # (BLOCK_D, BLOCK_N), same for every tile
    rows = row0.to(tl.int64) + offs_m

    # The residual: loaded once, resident across all Q stages. Padding columns
    # (d >= D) and rows past N are 0 and stay 0 (their gathered codes are masked).
    r = tl.load(z_blk + (offs_m[:, None] * D + offs_d[None, :]), mask=md_mask, other=0.0).to(acc_ty)

    for q in range(0, Q):
        cb_q = cb_ptr + tl.cast(q, tl.int64) * K * D
        code_q = code_ptr + tl.cast(q, tl.int64) * K  # per-code terms of stage q (unused for dot)
        best_s = tl.full([BLOCK_M], float("inf"), dtype=acc_ty)
        best_i = tl.full([BLOCK_M], _NO_INDEX, dtype=tl.int32)
        for n0 in range(0, K, BLOCK_N):
            n_left = K - n0
            e = tl.load(cb_q + tl.cast(n0, tl.int64) * D + e_off,
                        mask=d_mask[:, None] & (offs_n < n_left)[None, :], other=0.0).to(acc_ty)
            if _INTERPRETER:
                acc = tl.sum(r[:, :, None] * e[None, :, :], axis=1)
            elif DOT == 0:
                acc = tl.dot(r, e, input_precision="ieee", out_dtype=acc_ty)
            elif DOT == 1:
                acc = tl.dot(r, e, input_precision="tf32x3", out_dtype=acc_ty)
            else:
                acc = tl.dot(r, e, out_dtype=acc_ty)
            best_s, best_i = _merge_tile(acc, code_q, n0, n_left, best_s, best_i, METRIC, BLOCK_N)

        # A row with only NaN scores: index 0 and a NaN distance (the C++ rule).
        none = best_i == _NO_INDEX
        best_i = tl.where(none, 0, best_i)
        best_s = tl.where(none, float("nan"), best_s)
        if METRIC == 2:
            dist = best_s
        else:
            rsq = tl.sum(r * r, axis=1)  # |r_q|^2 from the resident tile
            if METRIC == 0:
                dist = best_s + rsq
                dist = tl.where(dist < 0.0, 0.0, dist)  # not maximum(): NaN must stay NaN
            elif rsq.dtype == tl.float64:
                dist = 1.0 + best_s * _inv_norm(rsq)
            else:
                # The row norm only scales the reported distance (the search compares
                # dot / |e|), so rsqrt.approx (2 ulp) serves here; the correctly rounded
                # sqrt/div of _inv_norm are subroutine calls that need a stack frame
                # inside the stage loop (an STL/LDL pair on sm_90).
                eps_sq: tl.constexpr = 1e-24  # _NORM_EPS ** 2
                dist = 1.0 + best_s * tl.math.rsqrt(tl.where(rsq > eps_sq, rsq, eps_sq))
        tl.store(idx_ptr + rows * Q + q, best_i.to(tl.int64), mask=m_mask)
        tl.store(dist_ptr + rows * Q + q, dist.to(acc_ty), mask=m_mask)

        # r_{q+1} = r_q - codebooks[q][i_q], in the accumulation dtype, on chip.
        chosen = tl.load(cb_q + best_i.to(tl.int64)[:, None] * D + offs_d[None, :], mask=md_mask, other=0.0)
        r = r - chosen.to(acc_ty)


# ---------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------

def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# BLOCK_D is not tuned: it is the whole (padded) row. Per dot flavour, because
# the operands live differently. On sm_80 both dots keep their operands in
# registers (the FMA dot by construction, mma.sync for tf32x3, which also holds
# the hi/lo halves of both operands), so the tiles shrink as BLOCK_D grows; the
# pruner keeps the configs whose residual + code tile, (BLOCK_M + BLOCK_N) x
# BLOCK_D elements, stay within a per-warp budget measured with
# `python -m vqfast kernels-report` (no spills on sm_80 / sm_90 for every kept
# config at BLOCK_D = 16 ... 256; e.g. tf32x3 64x32x32 with 4 warps, 768
# elements a warp, spills on sm_80, and the FMA dot at 64x64x64 with 8 warps,
# 1024, spills for the dot metric), and always the first (smallest) config.
# tf32x3 is only used up to TF32X3_MAX_BLOCK_D: beyond it even the smallest
# tile spills on sm_80, and fp16/bf16 inputs take the FMA dot instead.
IEEE_CONFIGS = [
    _cfg(16, 16, 8, 1),  # first: always kept; 4 warps spill at BLOCK_D 256 on sm_90 (D % 16 != 0)
    _cfg(32, 32, 4, 1),
    _cfg(64, 32, 8, 1),  # (32, 32) with 8 warps: an 8-byte stack frame at BLOCK_D 64 on sm_80
    _cfg(64, 64, 8, 1),
]
TF32X3_CONFIGS = [
    _cfg(32, 32, 4, 2),
    _cfg(32, 32, 8, 2),
    _cfg(64, 32, 4, 2),
    _cfg(64, 64, 4, 2),
    _cfg(64, 64, 8, 2),
    _cfg(128, 64, 8, 2),
]
F64_CONFIGS = [
    _cfg(16, 16, 4, 1),
    _cfg(32, 32, 4, 1),
    _cfg(32, 32, 8, 1),
    _cfg(64, 32, 8, 1),
]
GPU_CONFIGS = IEEE_CONFIGS + TF32X3_CONFIGS + F64_CONFIGS
_CONFIGS_FOR_DOT = {_DOT_IEEE: IEEE_CONFIGS, _DOT_TF32X3: TF32X3_CONFIGS, _DOT_NATIVE: F64_CONFIGS}
# Budget: (BLOCK_M + BLOCK_N) * BLOCK_D / num_warps, elements per warp.
_ELEMS_PER_WARP = {_DOT_IEEE: 768, _DOT_TF32X3: 512, _DOT_NATIVE: 1024}
TF32X3_MAX_BLOCK_D = 32

INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _dot_mode(dtype: torch.dtype, block_d: int) -> int:
    if dtype == torch.float64:
        return _DOT_NATIVE
    if dtype == torch.float32 or block_d > TF32X3_MAX_BLOCK_D:
        return _DOT_IEEE
    return _DOT_TF32X3


def _kept_configs(dot: int, block_d: int) -> list:
    """The configs the autotuner tries for this dot flavour and BLOCK_D."""
    configs = _CONFIGS_FOR_DOT[dot]
    return [c for i, c in enumerate(configs) if i == 0 or _fits(c, dot, block_d)]


def _fits(c, dot: int, block_d: int) -> bool:
    k = c.kwargs
    return (k["BLOCK_M"] + k["BLOCK_N"]) * block_d <= _ELEMS_PER_WARP[dot] * c.num_warps


def _prune(configs, named_args, **kwargs):
    dot, bd = kwargs["DOT"], kwargs["BLOCK_D"]
    offered = {id(c) for c in configs}
    return [c for c in _kept_configs(dot, bd) if id(c) in offered]


_residual_autotuned = triton.autotune(
    configs=GPU_CONFIGS,
    key=["Q", "K", "D", "METRIC", "DOT"],
    prune_configs_by={"early_config_prune": _prune},
)(_residual_nearest_code_kernel)


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _per_stage_fallback(z, codebooks, metric, indices, distances):
    """D > MAX_RESIDENT_D: Q launches of the single-stage search on the residual."""
    acc_dtype = distances.dtype
    r = z.to(acc_dtype, copy=True)  # updated in place below
    for q in range(codebooks.shape[0]):
        cb = codebooks[q].to(acc_dtype)
        i, d = nearest_code_triton(r, cb, metric)
        indices[:, q] = i
        distances[:, q] = d
        r -= cb.index_select(0, i)
    return indices, distances


def residual_nearest_code_triton(z: torch.Tensor, codebooks: torch.Tensor,
                                 metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int64, (N, Q)) and distances ((N, Q), float32; float64 for
    float64 input) of the residual search. z (N, D) and codebooks (Q, K, D):
    contiguous, same dtype (validated by vqfast.ops). metric: 0 l2, 1 cosine, 2 dot."""
    metric = int(metric)
    if metric not in (0, 1, 2):
        raise ValueError(f"metric must be 0 (l2), 1 (cosine) or 2 (dot), got {metric}")
    N, D = z.shape
    Q, K = codebooks.shape[0], codebooks.shape[1]
    acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    # Poisoned: the kernel must write every (row, stage).
    indices = torch.full((N, Q), -1, dtype=torch.int64, device=z.device)
    distances = torch.full((N, Q), float("nan"), dtype=acc_dtype, device=z.device)
    if N == 0 or Q == 0:
        return indices, distances
    if z.device.type == "cpu" and not _kernels_are_interpreted():
        raise RuntimeError("residual_nearest_code_triton on CPU tensors needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")
    if Q * K >= 2**31:
        raise ValueError(f"residual_nearest_code_triton: Q*K={Q * K} too large (code terms use int32 indices)")

    with torch.cuda.device(z.device) if z.device.type == "cuda" else _nullcontext():
        if D > MAX_RESIDENT_D:
            return _per_stage_fallback(z, codebooks, metric, indices, distances)
        if metric == 2:
            code = distances  # never read for the dot metric
        else:
            # Per-code terms of every stage at once: codebooks viewed as (Q*K, D).
            code = torch.empty((Q, K), dtype=acc_dtype, device=z.device)
            bk = CODE_TERM_BLOCK["BLOCK_K"]
            bd = min(CODE_TERM_BLOCK["BLOCK_D"], _block_d(D))
            _code_term_kernel[(triton.cdiv(Q * K, bk),)](codebooks, code, Q * K, D, METRIC=metric,
                                                         BLOCK_K=bk, BLOCK_D=bd)
        dot = _dot_mode(z.dtype, _block_d(D))
        if _interpreting(z):
            cfg = INTERPRETER_CONFIG
            _residual_nearest_code_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](
                z, codebooks, code, indices, distances, N, Q, K, D, METRIC=metric, DOT=dot,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=_block_d(D))
        else:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
            _residual_autotuned[grid](z, codebooks, code, indices, distances, N, Q, K, D,
                                      METRIC=metric, DOT=dot, BLOCK_D=_block_d(D))
    return indices, distances


# ---------------------------------------------------------------------------
# Static description for vqfast.kernels_report (the KERNELS convention of
# vqfast/triton/nearest_code.py): each variant compiled ahead of time.
# ---------------------------------------------------------------------------

_DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
_METRICS = {0: "l2", 1: "cosine", 2: "dot"}
_ALIGNED = ["z_ptr", "cb_ptr", "code_ptr", "idx_ptr", "dist_ptr", "D"]
_UNALIGNED = ["z_ptr", "cb_ptr", "code_ptr", "idx_ptr", "dist_ptr"]
_REPORT_BLOCK_D = (16, 32, 64, 128, 256)  # every BLOCK_D a launch can use


def _signature(dt):
    acc = "*fp64" if dt == "fp64" else "*fp32"
    return {"z_ptr": _DTYPES[dt], "cb_ptr": _DTYPES[dt], "code_ptr": acc, "idx_ptr": "*i64",
            "dist_ptr": acc, "N": "i32", "Q": "i32", "K": "i32", "D": "i32",
            "METRIC": "constexpr", "DOT": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}


def _variant(dt, metric, c, block_d, aligned):
    k = c.kwargs
    dot = _dot_mode(_TORCH_DTYPES[dt], block_d)
    return {
        "fn": "_residual_nearest_code_kernel",
        "name": f"residual_nearest_code[{dt},{_METRICS[metric]},{k['BLOCK_M']}x{k['BLOCK_N']}x{block_d},"
                f"w{c.num_warps}s{c.num_stages},{'D%16=0' if aligned else 'D%16!=0'}]",
        "signature": _signature(dt),
        "constexprs": {"METRIC": metric, "DOT": dot, "BLOCK_D": block_d, **k},
        "divisible_by_16": _ALIGNED if aligned else _UNALIGNED,
        "num_warps": c.num_warps, "num_stages": c.num_stages,
    }


def _kernel_variants():
    variants = []
    for dt in _DTYPES:
        for bd in _REPORT_BLOCK_D:
            kept = _kept_configs(_dot_mode(_TORCH_DTYPES[dt], bd), bd)
            # l2 (the most live registers) at the largest kept config, every BLOCK_D;
            # the other metrics and D % 16 != 0 at a tensor-core and the widest width.
            variants.append(_variant(dt, 0, kept[-1], bd, True))
            if bd in (64, 256):
                variants += [_variant(dt, m, kept[-1], bd, True) for m in (1, 2)]
                variants.append(_variant(dt, 0, kept[-1], bd, False))
            # The other kept configs (l2, D % 16 == 0): the sweep; bf16 compiles like fp16.
            if dt != "bf16":
                variants += [dict(_variant(dt, 0, c, bd, True), sweep=True) for c in kept[:-1]]
    return variants


KERNELS = [dict(v, fn=globals()[v["fn"]]) for v in _kernel_variants()]
