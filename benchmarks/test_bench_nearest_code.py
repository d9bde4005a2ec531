"""pytest-benchmark suite for nearest_code: vqfast backends and peers in one run.

    .venv/bin/python -m pytest benchmarks -q --benchmark-columns=median,ops
Sizes are CPU-friendly by default; VQFAST_BENCH_FULL=1 uses the issue's N=65536 grid.
Each case records GFLOP/s (2 N K D) in extra_info. Benchmarks never assert speed.
"""
import os

import pytest
import torch

import vqfast
from vqfast import bench, registry

FULL = os.environ.get("VQFAST_BENCH_FULL") == "1"
SIZES = bench.DEFAULT_SIZES if FULL else [(16384, 1024, 8), (16384, 1024, 64), (16384, 4096, 256)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def methods():
    out = {}
    for name in registry.available(DEVICE.type):
        if name == "triton" and DEVICE.type == "cpu":
            continue  # the interpreter is not a benchmark
        out[f"vqfast-{name}"] = (lambda n: lambda z, e: vqfast.nearest_code(z, e, backend=n))(name)
    out["cdist-argmin"] = bench.cdist_argmin
    out["addmm-argmin"] = bench.addmm_argmin
    fn, _ = bench.faiss_search()
    if fn is not None and DEVICE.type == "cpu":
        out["faiss-flatl2"] = fn
    return out


METHODS = methods()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", list(METHODS))
def test_nearest_code(benchmark, method, size):
    n, k, d = size
    z = torch.randn(n, d, device=DEVICE)
    e = torch.randn(k, d, device=DEVICE)
    fn = METHODS[method]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        out = fn(z, e)
        sync()
        return out

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = 2 * n * k * d / benchmark.stats.stats.median / 1e9
