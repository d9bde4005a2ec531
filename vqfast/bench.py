"""``python -m vqfast bench``: vqfast's kernels against what users run today, in one run.

For each size, every vqfast backend that runs on the device is timed next to
the peers (``torch.cdist(...).argmin``, the expanded ``addmm`` form, faiss-cpu's
``IndexFlatL2`` when installed) at the same thread count, and the table reports
the median time, GFLOP/s (2 N K D for the search), the percentage of this
machine's sgemm rate measured in the same run, the ratio to the fastest peer,
and the peak memory each method added on top of its inputs.
"""
from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import vqfast
from vqfast import registry

DEFAULT_SIZES = [(65536, k, d) for k in (1024, 16384) for d in (8, 64, 256)]
QUICK_SIZES = [(8192, 1024, 8), (8192, 1024, 64), (8192, 4096, 256)]
GPU_SIZES = [(262144, k, d) for k in (1024, 16384) for d in (64, 256)]


# ---- measurement ---------------------------------------------------------------

class PeakMemory:
    """Peak bytes a call adds above the memory in use when it starts.

    CPU: the process's resident high-water mark, reset through
    /proc/self/clear_refs (counts native allocations too, e.g. faiss's).
    CUDA: torch's allocator peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_ok = self._read("VmHWM") is not None and self._reset_cpu()
        if self.cpu_ok:
            self._fixed_mmap_threshold()

    @staticmethod
    def _fixed_mmap_threshold(threshold: int = 128 * 1024) -> None:
        """glibc raises its mmap threshold after big frees and then serves big
        blocks from already-resident heap pages, which the high-water mark
        cannot see. A fixed threshold maps every big block afresh."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass

    @staticmethod
    def _read(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                m = re.search(rf"{key}:\s+(\d+) kB", f.read())
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None

    @staticmethod
    def _reset_cpu() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def measure(self, fn: Callable[[], object]) -> int | None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            del out
            return torch.cuda.max_memory_allocated() - base
        if not self.cpu_ok:
            return None
        self._reset_cpu()
        base = self._read("VmRSS")
        out = fn()
        peak = self._read("VmHWM")
        del out
        return max(0, peak - base)


def time_call(fn: Callable[[], object], device: torch.device, *, min_reps: int = 3,
              budget_s: float = 2.0) -> float:
    """Median seconds per call: one warm-up, then at least min_reps timed runs
    (more while under budget_s)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    reps = max(min_reps, min(50, int(budget_s / max(first, 1e-6))))
    if first > budget_s:  # big cases: the warm-up already costs the budget
        reps = min_reps - 1 if min_reps > 1 else 1
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sgemm_rate(device: torch.device, n: int = 2048) -> float:
    """This machine's square float32 matmul rate, GFLOP/s, at the current thread count."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    t = time_call(lambda: a @ b, device, min_reps=5, budget_s=1.0)
    return 2 * n ** 3 / t / 1e9


# ---- methods ------------------------------------------------------------------

def cdist_argmin(z, e):
    return torch.cdist(z, e).argmin(-1)


def addmm_argmin(z, e):
    # ||z||^2 - 2 z e^T + ||e||^2, the form most VQ code writes by hand.
    d = (z * z).sum(-1, keepdim=True) + (e * e).sum(-1) - 2.0 * (z @ e.T)
    return d.argmin(-1)


def faiss_search():
    try:
        import faiss
    except ImportError:
        return None, "faiss-cpu not installed (pip install faiss-cpu)"

    def run(z, e):
        index = faiss.IndexFlatL2(e.shape[1])
        index.add(e.numpy())
        return index.search(z.numpy(), 1)

    faiss.omp_set_num_threads(torch.get_num_threads())
    return run, ""


@dataclass
class Row:
    size: tuple[int, int, int]
    method: str
    seconds: float | None = None
    gflops: float | None = None
    pct_sgemm: float | None = None
    peak_bytes: int | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def nearest_code_methods(device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    methods, notes = {}, {}
    for name in registry.available(device.type):
        if name == "triton" and device.type == "cpu":
            notes["vqfast[triton]"] = "interpreter only on CPU: not timed"
            continue
        methods[f"vqfast[{name}]"] = (lambda n: lambda z, e: vqfast.nearest_code(z, e, backend=n))(name)
    methods["torch.cdist+argmin"] = cdist_argmin
    methods["addmm+argmin"] = addmm_argmin
    if device.type == "cpu":
        fn, why = faiss_search()
        if fn is None:
            notes["faiss IndexFlatL2"] = why
        else:
            methods["faiss IndexFlatL2"] = fn
    return methods, notes


def bench_nearest_code(sizes, device: torch.device, *, skip_slow_peers_above: float = 16 * 2**30) -> tuple[list[Row], dict]:
    peak = sgemm_rate(device)
    mem = PeakMemory(device)
    rows: list[Row] = []
    methods, notes = nearest_code_methods(device)
    for n, k, d in sizes:
        torch.manual_seed(0)
        z = torch.randn(n, d, device=device)
        e = torch.randn(k, d, device=device)
        flops = 2.0 * n * k * d
        size_rows = []
        # Memory first, for every method, before any timing loop has churned the heap.
        for name, fn in methods.items():
            row = Row((n, k, d), name)
            size_rows.append(row)
            if name.startswith(("torch.cdist", "addmm")) and n * k * 4 > skip_slow_peers_above:
                row.note = f"skipped: N x K matrix would be {n * k * 4 / 2**30:.1f} GiB"
                continue
            row.peak_bytes = mem.measure(lambda: fn(z, e))
            row.extra["nk_matrix_bytes"] = n * k * 4
        for row in size_rows:
            if row.note:
                continue
            fn = methods[row.method]
            row.seconds = time_call(lambda: fn(z, e), device)
            row.gflops = flops / row.seconds / 1e9
            row.pct_sgemm = 100.0 * row.gflops / peak
        rows += size_rows
    return rows, {"sgemm_gflops": peak, "threads": torch.get_num_threads(), "notes": notes}


# ---- quantize (forward + backward) and the EMA update --------------------------------

QUANTIZE_SIZES = [(65536, 8192, 64)]
QUANTIZE_QUICK_SIZES = [(8192, 1024, 64)]


def plain_torch_quantizer(z, cb):
    """What a user writes today: cdist/argmin, embedding lookup, two MSE losses, STE."""
    idx = torch.cdist(z, cb).argmin(-1)
    zq = torch.nn.functional.embedding(idx, cb)
    commit = torch.nn.functional.mse_loss(z, zq.detach())
    cb_loss = torch.nn.functional.mse_loss(z.detach(), zq)
    return z + (zq - z).detach(), idx, commit, cb_loss


def _vq_pytorch(d: int, k: int, ema: bool, device):
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    layer = VectorQuantize(dim=d, codebook_size=k, decay=0.99, commitment_weight=0.25,
                           learnable_codebook=not ema, ema_update=ema).to(device)
    return layer.train()


def quantize_methods(n: int, k: int, d: int, device: torch.device):
    """(name -> step(z)) for a learnable-codebook step and an EMA step; each runs forward and backward."""
    torch.manual_seed(0)
    cb = torch.nn.Parameter(torch.randn(k, d, device=device))
    cs = torch.ones(k, device=device)
    ea = cb.detach().clone()
    g = torch.randn(n, d, device=device)
    methods, notes = {}, {}

    def vqfast_learnable(z, backend):
        r = vqfast.quantize(z, cb, backend=backend)
        ((r.z_q * g).sum() + 0.25 * r.commit_loss + r.codebook_loss).backward()

    def vqfast_ema(z, backend):
        r = vqfast.quantize(z, cb.detach(), backend=backend)
        ((r.z_q * g).sum() + 0.25 * r.commit_loss).backward()
        vqfast.ema_update_(cb.data, cs, ea, z.detach(), r.indices, decay=0.99, backend=backend)

    def plain_learnable(z):
        zq, _, c, b = plain_torch_quantizer(z, cb)
        ((zq * g).sum() + 0.25 * c + b).backward()

    for name in registry.available(device.type):
        if name == "triton" and device.type == "cpu":
            continue
        methods[f"learnable vqfast[{name}]"] = (lambda b: lambda z: vqfast_learnable(z, b))(name)
        methods[f"ema vqfast[{name}]"] = (lambda b: lambda z: vqfast_ema(z, b))(name)
    methods["learnable plain torch"] = plain_learnable
    for ema in (False, True):
        layer = _vq_pytorch(d, k, ema, device)
        label = f"{'ema' if ema else 'learnable'} vector-quantize-pytorch"
        if layer is None:
            notes[label] = "vector-quantize-pytorch not installed (pip install vector-quantize-pytorch)"
            continue
        with torch.no_grad():
            layer._codebook.embed.copy_(cb.detach()[None])

        def vq_step(z, layer=layer):
            out, _, loss = layer(z[None])
            ((out[0] * g).sum() + loss.sum()).backward()

        methods[label] = vq_step
    return methods, notes


def bench_quantize(sizes, device: torch.device) -> tuple[list[Row], dict]:
    mem = PeakMemory(device)
    rows: list[Row] = []
    notes: dict = {}
    for n, k, d in sizes:
        methods, notes = quantize_methods(n, k, d, device)
        z = torch.randn(n, d, device=device, requires_grad=True)
        size_rows = []
        for name, fn in methods.items():
            row = Row((n, k, d), name)
            row.peak_bytes = mem.measure(lambda: fn(z))
            row.extra["nk_matrix_bytes"] = n * k * 4
            size_rows.append(row)
        for row in size_rows:
            fn = methods[row.method]
            row.seconds = time_call(lambda: fn(z), device)
            # forward search + backward: ~2 N K D for the search, the rest is O(N D)
            row.gflops = 2.0 * n * k * d / row.seconds / 1e9
        rows += size_rows
    return rows, {"threads": torch.get_num_threads(), "notes": notes}


def group_rows(rows, key) -> dict:
    """Rows grouped by key(row), in first-seen order (one table block per size / case)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def ratio_cell(ref_seconds: float | None, seconds: float, width: int) -> str:
    """'ref / this' right-aligned in width characters, '-' without a reference."""
    return f"{ref_seconds / seconds:{width - 1}.2f}x" if ref_seconds else f"{'-':>{width}}"


def table_footer(meta: dict, explanation: str) -> list[str]:
    return [f"note: {name}: {note}" for name, note in meta.get("notes", {}).items()] + [explanation]


def format_quantize_table(rows: list[Row], meta: dict, title: str) -> str:
    out = [f"{title}  (threads={meta['threads']}; one training step = forward + backward (+ EMA update))"]
    head = f"{'N':>7} {'K':>6} {'D':>4}  {'method':<36} {'median':>9} {'vs plain torch':>14} {'vs vq-pytorch':>13} {'peak extra':>12}"
    out += [head, "-" * len(head)]
    for (n, k, d), group in group_rows(rows, lambda r: r.size).items():
        ref = {r.method: r.seconds for r in group}
        for r in group:
            kind = r.method.split()[0]
            vs_plain = ratio_cell(ref.get("learnable plain torch"), r.seconds, 14)
            vs_vqp = ratio_cell(ref.get(f"{kind} vector-quantize-pytorch"), r.seconds, 13)
            out.append(f"{n:>7} {k:>6} {d:>4}  {r.method:<36} {r.seconds * 1e3:7.1f}ms {vs_plain} {vs_vqp} "
                       f"{_fmt_bytes(r.peak_bytes):>12}")
    out += table_footer(meta, "ratios: the other method's time divided by this one's (>1 = this one is faster); "
                        "'vs vq-pytorch' compares like with like (learnable with learnable, EMA with EMA).")
    return "\n".join(out)


# ---- residual (multi-stage) search ---------------------------------------------------

RESIDUAL_STAGES = 8
RESIDUAL_SIZES = [(65536, 1024, 128)]
RESIDUAL_QUICK_SIZES = [(16384, 1024, 128)]
# --gpu-sizes: both sides of the Triton kernel's resident bound (D <= 256) and past it.
RESIDUAL_GPU_SIZES = [(262144, 1024, 64), (262144, 1024, 256), (262144, 1024, 512)]


def _vq_pytorch_residual(codebooks: torch.Tensor):
    """vector-quantize-pytorch's ResidualVQ in eval mode holding `codebooks`, or None."""
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return None
    q, k, d = codebooks.shape
    layer = ResidualVQ(dim=d, num_quantizers=q, codebook_size=k).to(codebooks.device).eval()
    with torch.no_grad():
        for s, stage in enumerate(layer.layers):
            stage._codebook.embed.copy_(codebooks[s][None])
    return layer


def residual_methods(codebooks: torch.Tensor, device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    methods, notes = {}, {}
    q = codebooks.shape[0]

    def sequential(z, backend):
        # What a residual quantizer built on the single-stage op does: Q searches,
        # the residual through memory between them.
        residual = z
        for s in range(q):
            idx, _ = vqfast.nearest_code(residual, codebooks[s], backend=backend)
            residual = residual - codebooks[s][idx]
        return residual

    for name in registry.available(device.type):
        if name == "triton" and device.type == "cpu":
            notes["vqfast[triton]"] = "interpreter only on CPU: not timed"
            continue
        if registry.op_reason(name, "residual_nearest_code"):
            notes[f"fused vqfast[{name}]"] = registry.op_reason(name, "residual_nearest_code")
        else:
            methods[f"fused vqfast[{name}]"] = (lambda n: lambda z: vqfast.residual_nearest_code(z, codebooks, backend=n))(name)
        methods[f"{q} x nearest_code[{name}]"] = (lambda n: lambda z: sequential(z, n))(name)
    layer = _vq_pytorch_residual(codebooks)
    if layer is None:
        notes["vector-quantize-pytorch ResidualVQ"] = "not installed (pip install vector-quantize-pytorch)"
    else:
        def vq_forward(z, layer=layer):
            with torch.no_grad():
                return layer(z[None])
        methods["vq-pytorch ResidualVQ"] = vq_forward
    return methods, notes


def bench_residual(sizes, device: torch.device, *, stages: int = RESIDUAL_STAGES) -> tuple[list[Row], dict]:
    mem = PeakMemory(device)
    rows: list[Row] = []
    notes: dict = {}
    for n, k, d in sizes:
        torch.manual_seed(0)
        z = torch.randn(n, d, device=device)
        codebooks = torch.randn(stages, k, d, device=device) * (0.6 ** torch.arange(stages, device=device)).view(-1, 1, 1)
        methods, notes = residual_methods(codebooks, device)
        size_rows = []
        for name, fn in methods.items():  # memory first, before timing loops churn the heap
            row = Row((n, k, d), name)
            row.peak_bytes = mem.measure(lambda: fn(z))
            size_rows.append(row)
        for row in size_rows:
            fn = methods[row.method]
            row.seconds = time_call(lambda: fn(z), device)
            row.gflops = 2.0 * n * k * d * stages / row.seconds / 1e9
        rows += size_rows
    return rows, {"threads": torch.get_num_threads(), "stages": stages, "notes": notes}


def format_residual_table(rows: list[Row], meta: dict, title: str) -> str:
    q = meta["stages"]
    out = [f"{title}  (Q={q} stages, threads={meta['threads']}; GFLOP/s counts 2 N K D Q)"]
    head = (f"{'N':>7} {'K':>6} {'D':>4}  {'method':<24} {'median':>9} {'GFLOP/s':>8} "
            f"{'vs Q x nearest_code':>19} {'vs ResidualVQ':>13} {'peak extra':>12}")
    out += [head, "-" * len(head)]
    for (n, k, d), group in group_rows(rows, lambda r: r.size).items():
        ref = {r.method: r.seconds for r in group}
        for r in group:
            backend = r.method[r.method.find("[") + 1:r.method.find("]")] if "[" in r.method else None
            vs_seq = ratio_cell(ref.get(f"{q} x nearest_code[{backend}]") if backend else None, r.seconds, 19)
            vs_vqp = ratio_cell(ref.get("vq-pytorch ResidualVQ"), r.seconds, 13)
            out.append(f"{n:>7} {k:>6} {d:>4}  {r.method:<24} {r.seconds * 1e3:7.1f}ms {r.gflops:8.1f} "
                       f"{vs_seq} {vs_vqp} {_fmt_bytes(r.peak_bytes):>12}")
    out += table_footer(meta, "ratios: the other method's time divided by this one's (>1 = this one is faster); "
                        "'vs Q x nearest_code' compares with the same backend's single-stage op called Q times.")
    return "\n".join(out)


# ---- report ---------------------------------------------------------------------

def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:8.1f} MiB"


def format_table(rows: list[Row], meta: dict, title: str) -> str:
    out = [f"{title}  (threads={meta['threads']}, sgemm {meta['sgemm_gflops']:.1f} GFLOP/s measured in this run)"]
    head = f"{'N':>7} {'K':>6} {'D':>4}  {'method':<22} {'median':>9} {'GFLOP/s':>8} {'%sgemm':>7} {'vs best peer':>12} {'peak extra':>12} {'% of NxK':>8}"
    out.append(head)
    out.append("-" * len(head))
    by_size: dict[tuple, list[Row]] = {}
    for r in rows:
        by_size.setdefault(r.size, []).append(r)
    for size, group in by_size.items():
        peers = [r.seconds for r in group if r.seconds and not r.method.startswith("vqfast")]
        best_peer = min(peers) if peers else None
        for r in group:
            n, k, d = size
            if r.seconds is None:
                out.append(f"{n:>7} {k:>6} {d:>4}  {r.method:<22} {r.note}")
                continue
            ratio = f"{best_peer / r.seconds:11.2f}x" if best_peer else f"{'-':>12}"
            nk = r.extra.get("nk_matrix_bytes")
            pct_nk = f"{100.0 * r.peak_bytes / nk:7.1f}%" if (r.peak_bytes is not None and nk) else f"{'n/a':>8}"
            out.append(f"{n:>7} {k:>6} {d:>4}  {r.method:<22} {r.seconds * 1e3:7.1f}ms {r.gflops:8.1f} "
                       f"{r.pct_sgemm:6.1f}% {ratio} {_fmt_bytes(r.peak_bytes):>12} {pct_nk}")
    for name, note in meta.get("notes", {}).items():
        out.append(f"note: {name}: {note}")
    out.append("'vs best peer': the fastest non-vqfast method's time divided by this one's (>1 = faster).")
    return "\n".join(out)


def parse_size(s: str) -> tuple[int, int, int]:
    try:
        n, k, d = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like NxKxD, e.g. 65536x1024x64, got {s!r}")
    return n, k, d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqfast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=parse_size, action="append",
                   help="NxKxD (repeatable); default: N=65536, K in {1024,16384}, D in {8,64,256}")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--gpu-sizes", action="store_true", help="N=262144, K in {1024,16384}, D in {64,256} "
                   "(residual: K=1024, D in {64,256,512})")
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) thread count")
    p.add_argument("--op", choices=("all", "nearest_code", "quantize", "residual", "layers"), default="all",
                   help="which suite to run (default: all)")
    p.add_argument("--layers", action="store_true", help="the drop-in layers against vector-quantize-pytorch "
                   "(same as --op layers)")
    args = p.parse_args(argv)
    if args.layers:
        args.op = "layers"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = args.size or (QUICK_SIZES if args.quick else GPU_SIZES if args.gpu_sizes else DEFAULT_SIZES)
    if args.op in ("all", "nearest_code"):
        rows, meta = bench_nearest_code(sizes, device)
        print(format_table(rows, meta, f"nearest_code on {device.type}"), flush=True)
    if args.op in ("all", "quantize"):
        qsizes = args.size or (QUANTIZE_QUICK_SIZES if args.quick else QUANTIZE_SIZES)
        rows, meta = bench_quantize(qsizes, device)
        print()
        print(format_quantize_table(rows, meta, f"quantize training step on {device.type}"))
    if args.op in ("all", "residual"):
        rsizes = args.size or (RESIDUAL_QUICK_SIZES if args.quick else
                               RESIDUAL_GPU_SIZES if args.gpu_sizes else RESIDUAL_SIZES)
        rows, meta = bench_residual(rsizes, device)
        print()
        print(format_residual_table(rows, meta, f"residual_nearest_code on {device.type}"), flush=True)
    if args.op in ("all", "layers"):
        from vqfast import bench_layers

        print()
        bench_layers.main(args.quick, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
