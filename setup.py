"""Builds vqfast._C: the CPU kernels always, the CUDA kernels whenever nvcc and a
CUDA build of torch are present (no GPU needed to compile and link them).

Environment:
  VQFAST_BUILD_CUDA=0/1     force the CUDA kernels off/on (default: auto)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0+PTX")
  VQFAST_DEBUG=1            -O0 -g
  VQFAST_LINEINFO=1         keep CUDA source-line info for profilers (Nsight)
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# TORCH_TARGET_VERSION=2.10: expose only the stable-ABI subset, so one build
# serves every torch from 2.10 on.
STABLE_ABI = "-DTORCH_TARGET_VERSION=0x020a000000000000"


def find_cuda_home():
    """The toolkit folder behind the `nvcc` on PATH.

    nvcc may be a wrapper script, so torch's guess (the parent of nvcc's
    folder) can be wrong; nvcc's own --dryrun prints the real TOP.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "p.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
    return os.path.normpath(m.group(1).strip()) if m else os.path.dirname(os.path.dirname(nvcc))


def nvidia_wheel_include_dirs():
    """cuBLAS/cuSPARSE headers that torch's CUDA headers include, shipped in the
    nvidia-* wheels (site-packages/nvidia/cu13/include) rather than the toolkit."""
    dirs = []
    try:
        import nvidia
    except ImportError:
        return dirs
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    flag = os.environ.get("VQFAST_BUILD_CUDA", "auto").lower()
    available = cuda_home is not None and torch.version.cuda is not None
    if flag in ("1", "true", "yes"):
        if not available:
            sys.exit("VQFAST_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing")
        return True
    if flag in ("0", "false", "no"):
        return False
    return available


def extensions():
    debug = os.environ.get("VQFAST_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    csrc = os.path.join(ROOT, "csrc")
    sources = [os.path.join(csrc, "vqfast.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    include_dirs = [csrc]
    cxx = opt + [STABLE_ABI, "-DPy_LIMITED_API=0x03090000", "-std=c++17"]
    build_cuda = want_cuda()
    print(f"vqfast: CUDA kernels {'ON' if build_cuda else 'OFF'} (CUDA_HOME={cuda_home})")
    if not build_cuda:
        return [CppExtension("vqfast._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, py_limited_api=True)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    include_dirs += nvidia_wheel_include_dirs()
    nvcc = opt + [STABLE_ABI, "-DUSE_CUDA", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]
    if os.environ.get("VQFAST_LINEINFO") == "1" or debug:  # source lines for profilers; triples the .so
        nvcc.append("-lineinfo")
    return [CUDAExtension("vqfast._C", sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx + ["-DUSE_CUDA"], "nvcc": nvcc},
                          py_limited_api=True)]


setup(
    name="vqfast",
    version="0.1.0",
    description="Fused vector-quantization kernels for PyTorch",
    packages=find_packages(include=["vqfast", "vqfast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.10", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "peers": ["faiss-cpu"],
    },
    python_requires=">=3.10",
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
