"""Which backends exist, which can run here, and why not.

Every op has the same four backends:

* ``torch``  - the pure-PyTorch reference (vqfast/reference), any device.
* ``cpu``    - C++ kernels in the vqfast._C extension (csrc/cpu), CPU tensors.
* ``cuda``   - C++/CUDA kernels in the same extension (csrc/cuda), CUDA tensors.
* ``triton`` - Triton kernels (vqfast/triton), CUDA tensors; CPU tensors too
               when TRITON_INTERPRET=1 (the interpreter, used by the tests).

A missing triton or extension never breaks ``import vqfast``: the affected
backends report themselves unavailable with the reason, and ``backend=None``
falls back to ``torch`` (with one warning).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

NAMES = ("torch", "cpu", "cuda", "triton")

# backend=None picks the first available entry for the tensors' device type.
# On CUDA, Triton leads: autotuned tiles and tensor cores for half inputs.
PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str = ""

    def __str__(self) -> str:
        where = ", ".join(self.devices) or "-"
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.name:7s} [{where}] {state}"


@functools.lru_cache(maxsize=None)
def _extension():
    """(module or None, reason). Importing the module registers the C++ kernels."""
    try:
        return importlib.import_module("vqfast._C"), ""
    except ImportError as ex:  # not built, or built against an incompatible torch
        return None, f"extension vqfast._C not loaded ({ex})"


def extension_has_kernel(op: str, dispatch_key: str) -> bool:
    mod, _ = _extension()
    return mod is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"vqfast::{op}", dispatch_key)


def extension_has_op(op: str) -> bool:
    mod, _ = _extension()
    return mod is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"vqfast::{op}", "CPU")


# The public op -> the name of its kernel: the C++ schema in csrc/vqfast.cpp.
KERNEL_OF = {"nearest_code": "nearest_code", "quantize": "quantize_forward", "ema_update_": "ema_update_",
             "residual_nearest_code": "residual_nearest_code"}
# The public op -> its module in vqfast/triton/ (quantize's forward and backward share one,
# vqfast/triton/quantize.py, which vqfast/ops/quantize.py imports).
TRITON_MODULE_OF = {"nearest_code": "nearest_code", "quantize": "quantize", "ema_update_": "ema_update_",
                    "residual_nearest_code": "residual_nearest_code"}


@functools.lru_cache(maxsize=None)
def op_reason(backend: str, op: str) -> str:
    """Why `backend` lacks `op` ("" if it has it); the backend itself may still be unavailable."""
    kernel = KERNEL_OF.get(op, op)
    if backend in ("cpu", "cuda"):
        key = "CPU" if backend == "cpu" else "CUDA"
        if _extension()[0] is not None and not extension_has_kernel(kernel, key):
            return f"vqfast._C has no {key} kernel for {op}"
    elif backend == "triton":
        if importlib.util.find_spec(f"vqfast.triton.{TRITON_MODULE_OF.get(op, kernel)}") is None:
            return f"no Triton kernel for {op}"
    return ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_reason() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as ex:
        return f"triton is not installed ({ex})"
    return ""


@functools.lru_cache(maxsize=None)
def status() -> dict[str, BackendStatus]:
    """Status of every backend in this process, in a fixed order (computed once)."""
    out = {"torch": BackendStatus("torch", True, ("cpu", "cuda"))}
    mod, why = _extension()
    if mod is None:
        out["cpu"] = BackendStatus("cpu", False, (), why)
        out["cuda"] = BackendStatus("cuda", False, (), why)
    else:
        out["cpu"] = BackendStatus("cpu", extension_has_kernel("nearest_code", "CPU"), ("cpu",),
                                   "" if extension_has_kernel("nearest_code", "CPU") else "no CPU kernels in vqfast._C")
        if not extension_has_kernel("nearest_code", "CUDA"):
            out["cuda"] = BackendStatus("cuda", False, (), "vqfast._C was built without CUDA kernels (VQFAST_BUILD_CUDA=0 or no nvcc)")
        elif not torch.cuda.is_available():
            out["cuda"] = BackendStatus("cuda", False, ("cuda",), "CUDA kernels are built, but no GPU is visible to torch")
        else:
            out["cuda"] = BackendStatus("cuda", True, ("cuda",))
    treason = _triton_reason()
    if treason:
        out["triton"] = BackendStatus("triton", False, (), treason)
    else:
        devices = ("cuda", "cpu") if triton_interpreting() else ("cuda",)
        if torch.cuda.is_available() or triton_interpreting():
            out["triton"] = BackendStatus("triton", True, devices)
        else:
            out["triton"] = BackendStatus("triton", False, devices,
                                          "no GPU visible and TRITON_INTERPRET is not 1")
    return out


def available(device_type: str) -> list[str]:
    return [s.name for s in status().values() if s.available and device_type in s.devices]


_warned: set[str] = set()


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """Picks the backend for a call, or raises naming the argument."""
    return _resolve(backend, device.type, op)


# The choice depends only on the process (what is built, installed and visible),
# so torch.compile may bake it into the graph instead of tracing the probing.
@torch.compiler.assume_constant_result
def _resolve(backend: str | None, dev: str, op: str) -> str:
    if backend is None:
        backend = os.environ.get("VQFAST_BACKEND") or None
    if backend is None:
        st = status()
        for name in PREFERENCE.get(dev, ("torch",)):
            if st[name].available and dev in st[name].devices and not op_reason(name, op):
                if name == "torch" and dev in ("cpu", "cuda"):
                    _warn_fallback(st, dev, op)
                return name
        return "torch"
    if backend not in NAMES:
        raise ValueError(f"{op}: backend must be one of {', '.join(NAMES)} or None, got {backend!r}")
    st = status()[backend]
    if not st.available:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {st.reason}")
    if dev not in st.devices:
        raise ValueError(f"{op}: backend {backend!r} runs on {', '.join(st.devices)} tensors, got {dev} tensors")
    why = op_reason(backend, op)
    if why:
        raise NotImplementedError(f"{op}: backend {backend!r} does not implement it: {why}")
    return backend


def _warn_fallback(st: dict[str, BackendStatus], dev: str, op: str) -> None:
    native = "cpu" if dev == "cpu" else "cuda"
    why = st[native].reason or op_reason(native, op)
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"vqfast: {op} uses the pure-PyTorch backend on {dev}: {why}", RuntimeWarning, stacklevel=4)
