"""pytest-benchmark suite for the drop-in layers: one training step (forward with the EMA update,
backward) of vqfast.nn.VectorQuantize / ResidualVQ against vector-quantize-pytorch at matched
settings and the same initial state.

    .venv/bin/python -m pytest benchmarks/test_bench_layers.py -q --benchmark-columns=median,ops
Small sizes by default; VQFAST_BENCH_FULL=1 runs the issue's sizes (``python -m vqfast bench
--layers`` prints the same comparison as a table with peak memory). Benchmarks never assert speed.
"""
import os

import pytest
import torch

from vqfast import bench_layers

FULL = os.environ.get("VQFAST_BENCH_FULL") == "1"
CASES = bench_layers.CASES if FULL else bench_layers.QUICK_CASES
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAMS = [(case, method) for case in CASES for method in bench_layers.layer_methods(case, DEVICE)[0]]


@pytest.mark.parametrize("case,method", PARAMS, ids=[f"{c.name}-{m}" for c, m in PARAMS])
def test_layer_step(benchmark, case, method):
    step = bench_layers.layer_methods(case, DEVICE)[0][method]
    x = torch.randn(case.batch, case.seq, dict(case.kwargs)["dim"], device=DEVICE, requires_grad=True)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        step(x)
        sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["rows"] = case.rows
