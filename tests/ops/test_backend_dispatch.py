"""Each backend runs its own kernel: no silent fall-back. Triton kernels are counted as they are
launched under the interpreter; the C++ and reference backends are seen as the custom ops the
profiler records (the C++ kernels are `vqfast::<op>`, the reference `vqfast::<op>_torch`)."""
import pytest
import torch
import triton.runtime.interpreter as interpreter

import vqfast
from tests.conftest import require_backend

# Triton kernels each public op must launch (forward and backward for quantize).
TRITON_KERNELS = {
    "nearest_code": {"_nearest_code_kernel"},
    "quantize": {"_quantize_forward_kernel", "_quantize_backward_rows_kernel"},
    "ema_update_": {"_ema_accumulate_kernel", "_ema_codebook_kernel"},
    "residual_nearest_code": {"_residual_nearest_code_kernel"},
}
# Custom ops each public op must dispatch to, per non-Triton backend.
CPP_OPS = {"nearest_code": {"vqfast::nearest_code"},
           "quantize": {"vqfast::quantize_forward", "vqfast::quantize_backward"},
           "ema_update_": {"vqfast::ema_update_"},
           "residual_nearest_code": {"vqfast::residual_nearest_code"}}


def run_op(op: str, backend: str) -> None:
    torch.manual_seed(0)
    z, cb = torch.randn(40, 16), torch.randn(24, 16)
    if op == "nearest_code":
        vqfast.nearest_code(z, cb, backend=backend)
    elif op == "quantize":
        zz, cc = z.requires_grad_(), cb.requires_grad_()
        r = vqfast.quantize(zz, cc, backend=backend)
        (r.z_q.square().sum() + r.commit_loss + r.codebook_loss).backward()
    elif op == "ema_update_":
        idx = torch.randint(0, 24, (40,))
        vqfast.ema_update_(cb.clone(), torch.ones(24), cb.clone(), z, idx, decay=0.9, backend=backend)
    else:
        vqfast.residual_nearest_code(z, torch.randn(3, 24, 16), backend=backend)


@pytest.mark.parametrize("op", list(TRITON_KERNELS))
def test_triton_backend_launches_its_kernels(op, monkeypatch):
    require_backend("triton")
    launched = []
    run = interpreter.InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counting_run)
    run_op(op, "triton")
    assert TRITON_KERNELS[op] <= set(launched), f"{op}: launched {launched}"


def custom_ops_called(op: str, backend: str) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_op(op, backend)
    return {e.name for e in prof.events() if e.name.startswith("vqfast::")}


@pytest.mark.parametrize("op", list(CPP_OPS))
def test_cpu_backend_runs_the_cpp_kernels(op):
    require_backend("cpu")
    called = custom_ops_called(op, "cpu")
    assert CPP_OPS[op] <= called, f"{op}: {called}"
    assert not any(name.endswith(("_torch", "_triton")) for name in called), called


@pytest.mark.parametrize("op", list(CPP_OPS))
def test_torch_backend_runs_the_reference(op):
    called = custom_ops_called(op, "torch")
    assert called and all(name.endswith("_torch") for name in called), f"{op}: {called}"
