"""Static checks of the CUDA sources (no GPU needed): every kernel launch is followed by
``check_launch("<kernel name>")``, and every CUDA runtime / CUB call's status goes
through ``check_cuda``, so a failed launch (bad configuration, too much shared memory,
no kernel image for the device) raises a Python RuntimeError naming the kernel instead
of surfacing later as a wrong result or an unrelated error (csrc/cuda/common.cuh).
"""
import re
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = sorted([*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh")])
# CUDA API calls that do not return a status to check
NO_STATUS = {"cudaGetLastError", "cudaGetErrorString", "cudaPeekAtLastError"}


def _code(path):
    """The source with comments and string contents kept apart: comments removed."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _global_kernels():
    names = set()
    for path in SOURCES:
        code = re.sub(r"__launch_bounds__\s*\([^)]*\)", " ", _code(path))
        for m in re.finditer(r"__global__[^(;{]*?(\w+)\s*\(", code):
            names.add(m.group(1))
    return names


def _launches(code):
    """(line, launched identifier, the statement that follows the launch) for each <<<...>>>."""
    for m in re.finditer(r"(\w+)\s*(?:<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?\s*<<<", code):
        # end of the launch statement: the ';' after the argument list's closing parenthesis
        close = code.index(">>>", m.end())
        i, depth = code.index("(", close), 0
        while True:
            c = code[i]
            depth += c == "("
            depth -= c == ")"
            i += 1
            if depth == 0:
                break
        end = code.index(";", i)
        following = code[end + 1:code.index(";", end + 1) + 1].strip()
        yield code.count("\n", 0, m.start()) + 1, m.group(1), following


def test_sources_found():
    assert SOURCES, f"no CUDA sources under {CUDA_DIR}"
    assert any(True for p in SOURCES for _ in _launches(_code(p))), "no kernel launches found: the parser is broken"


def _launch_gaps(filename, code, kernels):
    gaps = []
    for line, name, following in _launches(code):
        m = re.fullmatch(r'check_launch\(\s*"([^"]+)"\s*\)\s*;', following)
        if not m:
            gaps.append(f"{filename}:{line}: {name}<<<...>>> is not followed by check_launch(...): {following!r}")
            continue
        checked = m.group(1).split()[0]
        # a launch through a function-pointer variable (one of several instantiations) must name a kernel
        ok = checked == name if name in kernels else checked in kernels
        if not ok:
            gaps.append(f"{filename}:{line}: {name}<<<...>>> is checked as {m.group(1)!r}")
    return gaps


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_launch_is_checked_with_its_name(path):
    gaps = _launch_gaps(path.name, _code(path), _global_kernels())
    assert not gaps, "\n".join(gaps)


def test_the_launch_check_can_fail():
    snippet = """
      a_kernel<T, M><<<grid, kThreads, 0, stream>>>(x, f(y, z), n);
      check_launch("a_kernel");
      b_kernel<<<1, 32>>>(x);
      other();
      c_kernel<<<1, 32>>>(x);
      check_launch("a_kernel");
    """
    gaps = _launch_gaps("snippet", snippet, {"a_kernel", "b_kernel", "c_kernel"})
    assert len(gaps) == 2 and "b_kernel" in gaps[0] and "c_kernel" in gaps[1]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_cuda_api_status_is_checked(path):
    code = _code(path)
    gaps = []
    for m in re.finditer(r"\b(cuda[A-Z]\w*|cub::\w+(?:::\w+)*)\s*\(", code):
        if m.group(1) in NO_STATUS:
            continue
        statement_start = max(code.rfind(c, 0, m.start()) for c in ";{}") + 1
        if "check_cuda(" in code[statement_start:m.start()]:
            continue
        # or by hand: `const cudaError_t err = cudaX(...); STD_TORCH_CHECK(err == cudaSuccess, ...)`
        end = code.index(";", m.end())
        assigned = re.search(r"cudaError_t\s+(\w+)\s*=\s*$", code[statement_start:m.start()])
        if not (assigned and re.match(rf"\s*STD_TORCH_CHECK\(\s*{assigned.group(1)}\s*==\s*cudaSuccess",
                                      code[end + 1:])):
            gaps.append(f"{path.name}:{code.count(chr(10), 0, m.start()) + 1}: {m.group(1)}(...) status unchecked")
    assert not gaps, "\n".join(gaps)


def test_check_launch_raises_with_the_kernel_name():
    """The helper the launches use turns a CUDA error into a Torch error (a Python RuntimeError)
    carrying the kernel's name and CUDA's reason."""
    common = _code(CUDA_DIR / "common.cuh")
    body = re.search(r"void\s+check_launch\s*\(\s*const\s+char\s*\*\s*(\w+)\s*\)\s*\{(.*?)\n\}", common, re.S)
    assert body, "check_launch(const char* kernel) not found in common.cuh"
    arg, text = body.groups()
    assert "cudaGetLastError()" in text
    assert re.search(rf"TORCH_CHECK\(\s*err\s*==\s*cudaSuccess.*\b{arg}\b.*cudaGetErrorString\(err\)", text, re.S)


# ---- 64-bit offsets, statically -----------------------------------------------------------------
# N x K and N x D pass 2^31 elements at sizes people run, so an offset built from a size (N, K, D,
# Q) must not be a product of two 32-bit values. The CPU path is also tested at runtime past 2^31
# scores (test_contract.py::test_cpu_kernel_offsets_beyond_int32); the GPU tests cover N x D past
# 2^31 on a GPU (tests/gpu/test_residual_gpu.py). This catches `row * D` with both declared int.

SIZES = {"N", "K", "D", "Q", "Ki", "Di", "QK", "num_codes", "num_rows", "dim"}
BUILTINS_32 = {"threadIdx.x", "threadIdx.y", "blockIdx.x", "blockIdx.y", "blockIdx.z", "blockDim.x", "gridDim.x"}
_T32 = r"(?:const\s+)?(?:constexpr\s+)?(?:int|unsigned|unsigned\s+int|uint32_t|int32_t)"
_T64 = r"(?:const\s+)?(?:constexpr\s+)?(?:int64_t|uint64_t|size_t|long|ptrdiff_t|auto)"


def _functions(code):
    """Top-level chunks (one function, or one group of declarations, each)."""
    return re.split(r"\n\}", code)


def _narrow_products(filename, code):
    gaps = []
    offset = 0
    for chunk in _functions(code):
        names32 = set(re.findall(rf"\b{_T32}\s+(\w+)\s*(?=[=;,)\[])", chunk))
        names64 = set(re.findall(rf"\b{_T64}\s+(\w+)\s*(?=[=;,)\[])", chunk))
        narrow = (names32 - names64) | BUILTINS_32
        for m in re.finditer(r"([\w.]+)\s*\*\s*([\w.]+)", chunk):
            a, b = m.groups()
            widened = re.search(r"(?:int64_t|size_t)\([^()]*\)\s*\*\s*$", chunk[:m.start()])
            if a in narrow and b in narrow and (a in SIZES or b in SIZES) and not widened:  # (int64_t(q) * K) * D
                line = code.count("\n", 0, offset + m.start()) + 1
                gaps.append(f"{filename}:{line}: {m.group()} multiplies two 32-bit values into an offset")
        offset += len(chunk) + 2
    return gaps


@pytest.mark.parametrize("path", [*SOURCES, *sorted((CUDA_DIR.parent / "cpu").glob("*.*")),
                                  *sorted((CUDA_DIR.parent / "common").glob("*.h"))], ids=lambda p: p.name)
def test_offsets_are_64_bit(path):
    gaps = _narrow_products(path.name, _code(path))
    assert not gaps, "\n".join(gaps)


def test_the_offset_check_can_fail():
    snippet = """
    __global__ void k(const float* z, int D, int64_t K) {
      const int row = blockIdx.x;
      const float* zr = z + row * D;      // 32-bit
      const float* ok = z + int64_t(row) * D;
      const float* chain = z + int64_t(row) * K * D;
      const float* c = z + blockIdx.x * K;  // K is 64-bit here: fine
    }
    void host(int N, int D) { use(N * D); }
    """
    gaps = _narrow_products("snippet", snippet)
    assert len(gaps) == 2 and "row * D" in gaps[0] and "N * D" in gaps[1]
