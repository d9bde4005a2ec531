"""pytest-benchmark suite for a quantizer training step (forward + backward, + EMA update).

    .venv/bin/python -m pytest benchmarks/test_bench_quantize.py -q --benchmark-columns=median,ops
vqfast backends against the plain PyTorch quantizer and vector-quantize-pytorch (when
installed), learnable and EMA. Small sizes by default; VQFAST_BENCH_FULL=1 uses the
issue's N=65536, K=8192, D=64. Benchmarks never assert speed.
"""
import os

import pytest
import torch

from vqfast import bench

FULL = os.environ.get("VQFAST_BENCH_FULL") == "1"
SIZE = bench.QUANTIZE_SIZES[0] if FULL else bench.QUANTIZE_QUICK_SIZES[0]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
METHODS, _ = bench.quantize_methods(*SIZE, DEVICE)


@pytest.mark.parametrize("method", list(METHODS))
def test_quantize_step(benchmark, method):
    n, k, d = SIZE
    z = torch.randn(n, d, device=DEVICE, requires_grad=True)
    fn = METHODS[method]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        fn(z)
        sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["size"] = "x".join(map(str, SIZE))
