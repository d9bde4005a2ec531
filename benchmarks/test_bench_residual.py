"""pytest-benchmark suite for residual_nearest_code: the fused Q-stage search against
Q calls of the single-stage op and vector-quantize-pytorch's ResidualVQ, in one run.

    .venv/bin/python -m pytest benchmarks/test_bench_residual.py -q --benchmark-columns=median,ops
Q=8, K=1024, D=128 (the issue's case) at N=16384; VQFAST_BENCH_FULL=1 uses N=65536.
Each case records GFLOP/s (2 N K D Q) in extra_info. Benchmarks never assert speed.
"""
import os

import pytest
import torch

from vqfast import bench

FULL = os.environ.get("VQFAST_BENCH_FULL") == "1"
SIZES = bench.RESIDUAL_SIZES if FULL else bench.RESIDUAL_QUICK_SIZES
STAGES = bench.RESIDUAL_STAGES
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_codebooks(k, d):
    g = torch.Generator().manual_seed(0)
    scale = (0.6 ** torch.arange(STAGES, dtype=torch.float32)).view(-1, 1, 1)
    return (torch.randn(STAGES, k, d, generator=g) * scale).to(DEVICE)


# Method names are fixed at collection (the same for every size); the callables
# are built per size around that size's codebooks.
METHOD_NAMES = list(bench.residual_methods(make_codebooks(4, 2), DEVICE)[0])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_residual_nearest_code(benchmark, method, size):
    n, k, d = size
    z = torch.randn(n, d, device=DEVICE)
    fn = bench.residual_methods(make_codebooks(k, d), DEVICE)[0][method]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        out = fn(z)
        sync()
        return out

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops"] = 2 * n * k * d * STAGES / benchmark.stats.stats.median / 1e9
