"""``python -m vqfast bench --layers``: the drop-in layers against vector-quantize-pytorch.

One training step (forward + backward; the EMA codebook update happens inside the forward) of
``VectorQuantize`` and ``ResidualVQ`` at matched settings: the same constructor arguments, the
same initial state (vqfast's layer loads the peer's state_dict), the same input. Reported per
configuration: median time, the ratio to vector-quantize-pytorch, and the peak memory each step
adds above its inputs (RSS high-water on CPU, the allocator's peak on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vqfast import registry
from vqfast.bench import PeakMemory, _fmt_bytes, group_rows, ratio_cell, table_footer, time_call


@dataclass(frozen=True)
class LayerCase:
    name: str
    layer: str  # "VectorQuantize" or "ResidualVQ"
    batch: int
    seq: int
    kwargs: tuple  # sorted (name, value) pairs
    train: bool = True  # False: an eval forward under no_grad (inference)

    @property
    def rows(self) -> int:
        return self.batch * self.seq


def _case(name, layer, batch, seq, train=True, **kwargs) -> LayerCase:
    return LayerCase(name, layer, batch, seq, tuple(sorted(kwargs.items())), train)


# The targets: VectorQuantize at codebook_size 16384; ResidualVQ at Q=8, K=1024, D=128.
CASES = [
    _case("VQ ema K=1024 D=64", "VectorQuantize", 8, 4096, dim=64, codebook_size=1024),
    _case("VQ ema K=16384 D=64", "VectorQuantize", 8, 4096, dim=64, codebook_size=16384),
    _case("VQ learnable K=16384 D=64", "VectorQuantize", 8, 4096, dim=64, codebook_size=16384,
          learnable_codebook=True, ema_update=False),
    _case("RVQ ema Q=8 K=1024 D=128", "ResidualVQ", 4, 4096, dim=128, num_quantizers=8, codebook_size=1024),
    _case("RVQ eval Q=8 K=1024 D=128", "ResidualVQ", 4, 4096, train=False, dim=128, num_quantizers=8,
          codebook_size=1024),
]
QUICK_CASES = [
    _case("VQ ema K=1024 D=64", "VectorQuantize", 2, 1024, dim=64, codebook_size=1024),
    _case("VQ ema K=16384 D=64", "VectorQuantize", 2, 1024, dim=64, codebook_size=16384),
    _case("RVQ ema Q=8 K=1024 D=128", "ResidualVQ", 1, 1024, dim=128, num_quantizers=8, codebook_size=1024),
]


def _peer(case: LayerCase, device):
    try:
        import vector_quantize_pytorch as vqp
    except ImportError:
        return None
    return getattr(vqp, case.layer)(**dict(case.kwargs)).to(device).train()


def _ours(case: LayerCase, device, backend: str, state: dict | None, fused: bool = True):
    import vqfast.nn as vqnn

    layer = getattr(vqnn, case.layer)(**dict(case.kwargs)).to(device).train()
    if state is not None:
        layer.load_state_dict(state)
    for m in layer.modules():
        if isinstance(m, vqnn.VectorQuantize):
            m.backend = backend
    if hasattr(layer, "fused"):
        layer.fused = fused
    return layer


def layer_methods(case: LayerCase, device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    """(label -> step(x)) for vqfast's layer on each backend and vector-quantize-pytorch's."""
    torch.manual_seed(0)
    peer = _peer(case, device)
    state = None if peer is None else {k: v.clone() for k, v in peer.state_dict().items()}
    dim = dict(case.kwargs)["dim"]
    g = torch.randn(case.batch, case.seq, dim, device=device)
    methods, notes = {}, {}

    def step_of(layer):
        if not case.train:
            layer.eval()

            @torch.no_grad()
            def infer(x):
                return layer(x)
            return infer

        def step(x):
            out, _, loss = layer(x)
            ((out * g).sum() + loss.sum()).backward()
        return step

    for backend in registry.available(device.type):
        if backend in ("torch",) or (backend == "triton" and device.type == "cpu"):
            continue  # the reference and the Triton interpreter are correctness tools, not contenders
        methods[f"vqfast[{backend}]"] = step_of(_ours(case, device, backend, state))
        if case.layer == "ResidualVQ":
            looped = _ours(case, device, backend, state, fused=False)
            if hasattr(looped, "fused"):
                methods[f"vqfast[{backend}] stage loop"] = step_of(looped)
    if peer is None:
        notes["vector-quantize-pytorch"] = "not installed (pip install vector-quantize-pytorch)"
    else:
        methods["vector-quantize-pytorch"] = step_of(peer)
    return methods, notes


@dataclass
class LayerRow:
    case: LayerCase
    method: str
    seconds: float = float("nan")
    peak_bytes: int | None = None


def bench_layers(cases, device: torch.device) -> tuple[list[LayerRow], dict]:
    mem = PeakMemory(device)
    rows: list[LayerRow] = []
    notes: dict = {}
    for case in cases:
        methods, case_notes = layer_methods(case, device)
        notes.update(case_notes)
        x = torch.randn(case.batch, case.seq, dict(case.kwargs)["dim"], device=device, requires_grad=True)
        case_rows = [LayerRow(case, name) for name in methods]
        for row in case_rows:  # memory first (one step each), then timing
            row.peak_bytes = mem.measure(lambda: methods[row.method](x))
        for row in case_rows:
            row.seconds = time_call(lambda: methods[row.method](x), device, min_reps=2)
        rows += case_rows
    return rows, {"threads": torch.get_num_threads(), "notes": notes}


def format_layers_table(rows: list[LayerRow], meta: dict, title: str) -> str:
    out = [f"{title}  (threads={meta['threads']}; a training step = forward (with the EMA update) + backward; "
           "'eval' rows: a forward under no_grad)"]
    head = (f"{'layer':<26} {'rows':>6}  {'method':<28} {'median':>9} {'vs vq-pytorch':>13} "
            f"{'peak extra':>12} {'mem vs vq-pytorch':>17}")
    out += [head, "-" * len(head)]
    for case, group in group_rows(rows, lambda r: r.case).items():
        peer = next((r for r in group if r.method == "vector-quantize-pytorch"), None)
        for r in group:
            speed = ratio_cell(peer.seconds if peer else None, r.seconds, 13)
            mem = (f"{r.peak_bytes / peer.peak_bytes:16.3f}x" if peer and peer.peak_bytes and r.peak_bytes is not None
                   else f"{'-':>17}")
            out.append(f"{case.name:<26} {case.rows:>6}  {r.method:<28} {r.seconds * 1e3:7.1f}ms {speed} "
                       f"{_fmt_bytes(r.peak_bytes):>12} {mem}")
    out += table_footer(meta, "'vs vq-pytorch': its time / this one's (>1 = faster); 'mem vs vq-pytorch': this "
                        "one's peak extra memory / its (<1 = less).")
    return "\n".join(out)


def main(quick: bool, device: torch.device) -> None:
    rows, meta = bench_layers(QUICK_CASES if quick else CASES, device)
    print(format_layers_table(rows, meta, f"drop-in layers on {device.type}"), flush=True)
