"""Static resource report for vqfast's GPU kernels; needs no GPU.

    python -m vqfast.kernels_report [--arch 80 --arch 90] [--json rows.json] [--no-strict]

(a) Triton: every kernel variant listed in the ``KERNELS`` list of each module
    in vqfast/triton/ is compiled ahead of time with ``triton.compile`` for each
    requested arch (``GPUTarget("cuda", arch, 32)``), in a subprocess with
    TRITON_INTERPRET removed from the environment (under the interpreter
    ``@triton.jit`` yields interpreted functions, which cannot be compiled).
(b) CUDA: the kernels in the built extension vqfast/_C*.so, read with
    ``cuobjdump -res-usage`` and ``cuobjdump -sass`` (the .so is located without
    importing vqfast).

For each kernel and arch it lists registers, stack frame bytes, shared memory,
local-memory instructions in the SASS (LDL/STL), and the tensor-core
instructions found in the SASS (HMMA/HGMMA/IMMA/DMMA/...).

Spills: a Triton kernel never has a local array, so any stack frame is register
spilling. For the CUDA kernels a stack frame may also come from a local array
indexed at run time; either way it is local memory in a hot kernel, and it is
reported as a spill (the build also passes -Xptxas=-warn-spills).

Exit status (strict, the default): 1 if the extension has no CUDA kernels, a
Triton variant failed to compile, or any kernel spills; 0 otherwise.
``--no-strict`` always exits 0 once the report is printed.

cuobjdump comes from the Triton package (triton/backends/nvidia/bin), falling
back to the one on PATH and then $CUDA_HOME/bin.
"""
from __future__ import annotations

import argparse
import glob
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(PKG_DIR)
TRITON_DIR = os.path.join(PKG_DIR, "triton")

# Tensor-core instruction families in SASS (Ampere: HMMA/IMMA/DMMA; Hopper
# warpgroup: HGMMA/IGMMA/QGMMA; Blackwell: UTC*MMA, OMMA, QMMA).
_TC_OPCODE = re.compile(r"^(?:[HIDQBO]MMA|[HIQB]GMMA|UTC\w*MMA)\b")
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Za-z0-9_.]*)?")
_LOCAL_OPCODES = ("LDL", "STL")


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    """`name` (cuobjdump, nvdisasm) from the Triton package, else PATH, else $CUDA_HOME/bin."""
    spec = importlib.util.find_spec("triton")  # locates triton without importing it
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "backends", "nvidia", "bin", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    path = shutil.which(name)
    if path:
        return path
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            path = os.path.join(home, "bin", name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def _run(cmd: list[str], timeout: int = 300) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[:500]}")
    return out.stdout


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> shortened demangled name (c++filt when available)."""
    names = list(dict.fromkeys(names))
    demangled = dict(zip(names, names))
    cxxfilt = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if cxxfilt and names:
        try:
            out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True,
                                 text=True, timeout=60)
            lines = out.stdout.splitlines()
            if out.returncode == 0 and len(lines) == len(names):
                demangled = dict(zip(names, lines))
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {k: shorten(v) for k, v in demangled.items()}


def shorten(name: str) -> str:
    """Drop the return type and the parameter list; keep namespaces and template arguments."""
    name = name.replace("(anonymous namespace)::", "")
    if name.startswith("void "):
        name = name[len("void "):]
    # Cut at the '(' that opens the parameter list (the first one at template depth 0).
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0:
            return name[:i]
    return name


# ---------------------------------------------------------------------------
# cuobjdump parsing
# ---------------------------------------------------------------------------

def parse_res_usage(text: str, default_arch: str | None = None) -> dict[tuple[str, str], dict]:
    """{(arch, mangled function): {"regs", "stack", "shared", "local"}} from `cuobjdump -res-usage`."""
    res: dict[tuple[str, str], dict] = {}
    arch, func = default_arch, None
    for line in text.splitlines():
        m = re.match(r"\s*arch\s*=\s*(sm_\w+)", line)
        if m:
            arch, func = m.group(1), None
            continue
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            fields = dict(re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line))
            res[(arch or "sm_?", func)] = {
                "regs": int(fields.get("REG", 0)),
                "stack": int(fields.get("STACK", 0)),
                "shared": int(fields.get("SHARED", 0)),
                "local": int(fields.get("LOCAL", 0)),
            }
            func = None
    return res


def parse_sass(text: str, default_arch: str | None = None) -> dict[tuple[str, str], dict]:
    """{(arch, mangled function): {"tc": {opcode: count}, "local_ldst": n}} from `cuobjdump -sass`."""
    res: dict[tuple[str, str], dict] = {}
    arch, cur = default_arch, None
    for line in text.splitlines():
        m = re.match(r"\s*code for (sm_\w+)", line)
        if m:
            arch, cur = m.group(1), None
            continue
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            cur = res.setdefault((arch or "sm_?", m.group(1)), {"tc": {}, "local_ldst": 0})
            continue
        if cur is None:
            continue
        m = _SASS_INSN.search(line)
        if not m:
            continue
        op = m.group(1)
        if _TC_OPCODE.match(op):
            full = op + (m.group(2) or "")
            cur["tc"][full] = cur["tc"].get(full, 0) + 1
        elif op in _LOCAL_OPCODES:
            cur["local_ldst"] += 1
    return res


def inspect_binary(path: str, default_arch: str | None = None) -> dict[tuple[str, str], dict]:
    """Merged res-usage and SASS facts per (arch, function) of a cubin or a host .so."""
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (triton/backends/nvidia/bin, PATH, $CUDA_HOME/bin)")
    usage_text = _run_cuobjdump([cuobjdump, "-res-usage", path])
    if usage_text is None:
        return {}
    usage = parse_res_usage(usage_text, default_arch)
    sass = parse_sass(_run_cuobjdump([cuobjdump, "-sass", path]) or "", default_arch)
    # res-usage says "sm_90" where the SASS says "sm_90a": join on the number.
    sass_by = {(_arch_num(a), f): (a, v) for (a, f), v in sass.items()}
    out = {}
    for (arch, fn), info in usage.items():
        row = {"regs": None, "stack": None, "shared": None, "local": None, "tc": {}, "local_ldst": 0}
        row.update(info)
        sarch, sinfo = sass_by.pop((_arch_num(arch), fn), (arch, {}))
        row.update(sinfo)
        out[(sarch if len(sarch) > len(arch) else arch, fn)] = row
    for (_, fn), (sarch, sinfo) in sass_by.items():  # in the SASS only
        row = {"regs": None, "stack": None, "shared": None, "local": None, "tc": {}, "local_ldst": 0}
        row.update(sinfo)
        out[(sarch, fn)] = row
    return out


def _run_cuobjdump(cmd: list[str]) -> str | None:
    """cuobjdump's stdout; None for a file without device code (exit 255)."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        if "does not contain device code" in (out.stderr + out.stdout):
            return None
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[:500]}")
    return out.stdout


def _arch_num(arch: str) -> int:
    m = re.match(r"sm_(\d+)", arch or "")
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------
# (a) Triton kernels (compiled in a subprocess without TRITON_INTERPRET)
# ---------------------------------------------------------------------------

def _triton_module_files() -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(TRITON_DIR, "*.py"))
                  if not os.path.basename(p).startswith("_"))


def _load_triton_module(path: str):
    """A vqfast/triton module by file path (so vqfast/__init__ is not run); the
    package import is the fallback for modules with package-relative imports."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"_vqfast_kernels_report_{stem}"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    except ImportError:
        sys.modules.pop(name, None)
        if REPO_ROOT not in sys.path:
            sys.path.insert(0, REPO_ROOT)
        return importlib.import_module(f"vqfast.triton.{stem}")


def _worker(archs: list[int], shard: int, nshards: int, out_path: str, quick: bool = False) -> None:
    """Runs in the subprocess: compile this shard's variants, inspect the cubins."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows, jobs = [], []
    for path in _triton_module_files():
        modname = "vqfast.triton." + os.path.splitext(os.path.basename(path))[0]
        try:
            mod = _load_triton_module(path)
        except Exception as e:  # noqa: BLE001 - reported as a row
            if shard == 0:
                rows.append({"source": "triton", "module": modname, "kernel": "<import>", "arch": "-",
                             "status": "error", "error": f"{type(e).__name__}: {e}"})
            continue
        for variant in getattr(mod, "KERNELS", []):
            if quick and variant.get("sweep"):
                continue
            for arch in archs:
                jobs.append((modname, variant, arch))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (modname, v, arch) in enumerate(jobs):
            if i % nshards != shard:
                continue
            fn = v["fn"]
            row = {"source": "triton", "module": modname, "kernel": v.get("name", fn.__name__),
                   "function": fn.__name__, "arch": f"sm_{arch}", "order": i}
            try:
                opts = {"num_warps": v.get("num_warps", 4), "num_stages": v.get("num_stages", 3)}
                opts.update(v.get("options", {}))
                # Launch-time specialisation: args Triton may assume 16-divisible
                # (pointers 16-byte aligned, ints multiples of 16).
                attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
                         for a in v.get("divisible_by_16", [])}
                src = ASTSource(fn, v["signature"], v.get("constexprs", {}), attrs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
                cubin = os.path.join(tmp, f"k{i}.cubin")
                with open(cubin, "wb") as f:
                    f.write(compiled.asm["cubin"])
                facts = inspect_binary(cubin, default_arch=f"sm_{arch}")
                if len(facts) != 1:
                    raise RuntimeError(f"expected one function in the cubin, found {len(facts)}")
                (_, info), = facts.items()
                ptx = compiled.asm.get("ptx", "")
                row.update(info)
                # Triton allocates its shared memory dynamically: metadata.shared.
                row["shared"] = (info.get("shared") or 0) + int(getattr(compiled.metadata, "shared", 0) or 0)
                row["ptx_mma"] = bool(re.search(r"\b(?:wgmma|mma)\.", ptx))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - reported as a row
                row.update(status="error", error=f"{type(e).__name__}: {str(e).strip()[:2000]}")
            rows.append(row)
    with open(out_path, "w") as f:
        json.dump(rows, f)


_WORKER_BOOT = ("import sys, importlib.util as u; "
                "s = u.spec_from_file_location('_vqfast_kernels_report', sys.argv[1]); "
                "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.main(sys.argv[2:]))")


def triton_rows(archs=(80, 90), jobs: int | None = None, quick: bool = False) -> list[dict]:
    if importlib.util.find_spec("triton") is None:
        return [{"source": "triton", "kernel": "<triton>", "arch": "-", "status": "error",
                 "error": "triton is not installed"}]
    jobs = max(1, jobs or min(os.cpu_count() or 1, 8))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for shard in range(jobs):
            out = os.path.join(tmp, f"rows{shard}.json")
            # Not `python this_file.py`: that would put vqfast/ first on sys.path,
            # where vqfast/triton/ shadows the real triton package.
            cmd = [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__), "--_worker", str(shard),
                   str(jobs), out, *[f"--arch={a}" for a in archs], *(["--quick"] if quick else [])]
            log = open(os.path.join(tmp, f"log{shard}.txt"), "w+")  # a file, not a pipe: no deadlock
            procs.append((subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT),
                          out, log))
        for proc, out, logf in procs:
            proc.wait()
            logf.seek(0)
            log = logf.read()
            logf.close()
            if proc.returncode != 0 or not os.path.exists(out):
                rows.append({"source": "triton", "kernel": "<worker>", "arch": "-", "status": "error",
                             "error": f"compile worker exited {proc.returncode}: {log.strip()[-2000:]}"})
                continue
            with open(out) as f:
                rows += json.load(f)
    rows.sort(key=lambda r: r.get("order", -1))
    for r in rows:
        r.pop("order", None)
    if not any(r.get("status") == "ok" for r in rows) and not any(r.get("status") == "error" for r in rows):
        rows.append({"source": "triton", "kernel": "<none>", "arch": "-", "status": "error",
                     "error": f"no KERNELS found in {TRITON_DIR}"})
    return rows


# ---------------------------------------------------------------------------
# (b) CUDA kernels of the built extension
# ---------------------------------------------------------------------------

def find_extension() -> str | None:
    """Path of vqfast/_C*.so: next to this file first, then wherever `vqfast`
    resolves (find_spec on the top-level package does not execute it)."""
    dirs = [PKG_DIR]
    mod = sys.modules.get("vqfast._C")
    if mod is not None and getattr(mod, "__file__", None):
        return mod.__file__
    try:
        spec = importlib.util.find_spec("vqfast")
        if spec and spec.submodule_search_locations:
            dirs += [d for d in spec.submodule_search_locations if d not in dirs]
    except (ImportError, ValueError):
        pass
    for d in dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(d, "_C" + suffix)
            if os.path.isfile(path):
                return path
    return None


def cuda_rows(archs=(80, 90), so_path: str | None = None) -> list[dict]:
    so_path = so_path or find_extension()
    if so_path is None:
        return [{"source": "cuda", "kernel": "<none>", "arch": "-", "status": "error",
                 "error": "vqfast._C extension not found (build it: pip install -e . / setup.py build_ext --inplace)"}]
    try:
        facts = inspect_binary(so_path)
    except Exception as e:  # noqa: BLE001
        return [{"source": "cuda", "kernel": "<none>", "arch": "-", "status": "error", "so": so_path,
                 "error": f"{type(e).__name__}: {e}"}]
    if not facts:
        return [{"source": "cuda", "kernel": "<none>", "arch": "-", "status": "error", "so": so_path,
                 "error": f"no CUDA kernels in {so_path} (CPU-only build? nvcc missing or VQFAST_BUILD_CUDA=0)"}]
    names = demangle([fn for (_, fn) in facts])
    rows = []
    for (arch, fn), info in sorted(facts.items(), key=lambda kv: (names[kv[0][1]], _arch_num(kv[0][0]))):
        rows.append({"source": "cuda", "module": os.path.basename(so_path), "kernel": names[fn],
                     "function": fn, "arch": arch, "status": "ok", **info})
    present = {_arch_num(a) for (a, _) in facts}
    for a in archs:
        if a not in present:
            rows.append({"source": "cuda", "kernel": "<arch>", "arch": f"sm_{a}", "status": "warn",
                         "error": f"no sm_{a} SASS in {os.path.basename(so_path)} (PTX JIT at load time, if any)"})
    return rows


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _finish(row: dict) -> dict:
    if row.get("status") == "ok":
        row["spills"] = bool(row.get("stack") or row.get("local") or row.get("local_ldst"))
        row["tensor_cores"] = bool(row.get("tc"))
    return row


def report(archs=(80, 90), so_path: str | None = None, jobs: int | None = None,
           triton: bool = True, cuda: bool = True, quick: bool = False) -> list[dict]:
    """Rows for every Triton variant x arch and every CUDA kernel x arch in the
    extension. Failure conditions appear as rows with status "error"."""
    archs = tuple(int(a) for a in archs)
    rows = []
    if triton:
        rows += triton_rows(archs, jobs, quick)
    if cuda:
        rows += cuda_rows(archs, so_path)
    return [_finish(r) for r in rows]


def failures(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("status") == "error":
            out.append(f"{r['source']} {r.get('kernel')} {r.get('arch')}: {r.get('error')}")
        elif r.get("status") == "ok" and r.get("spills"):
            out.append(f"{r['source']} {r['kernel']} {r['arch']}: spills (stack {r.get('stack')} B, "
                       f"{r.get('local_ldst')} LDL/STL)")
    return out


def format_table(rows: list[dict]) -> str:
    head = ["source", "arch", "kernel", "regs", "stack", "smem", "LDL/STL", "tensor-core ops (SASS: count)",
            "status"]
    body = []
    for r in rows:
        if r.get("status") == "ok":
            tc = ", ".join(f"{k}:{v}" for k, v in sorted(r.get("tc", {}).items())) or "-"
            body.append([r["source"], r["arch"], r["kernel"], str(r.get("regs")), str(r.get("stack")),
                         str(r.get("shared")), str(r.get("local_ldst")), tc,
                         "SPILLS" if r.get("spills") else "ok"])
        else:
            err = (r.get("error") or "").splitlines()
            body.append([r["source"], r.get("arch", "-"), r.get("kernel", "?"), "", "", "", "", "",
                         f"{r.get('status', '?').upper()}: {err[0] if err else ''}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])  # last column is not padded
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_worker"]:
        shard, nshards, out = int(argv[1]), int(argv[2]), argv[3]
        archs = [int(a.split("=", 1)[1]) for a in argv[4:] if a.startswith("--arch=")]
        _worker(archs, shard, nshards, out, quick="--quick" in argv[4:])
        return 0
    p = argparse.ArgumentParser(prog="python -m vqfast.kernels_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="SM arch to compile Triton kernels for "
                   "(repeatable; default 80 and 90)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--so", metavar="PATH", help="extension library to inspect (default: vqfast/_C*.so)")
    p.add_argument("--jobs", type=int, default=None, help="parallel Triton compile workers")
    p.add_argument("--quick", action="store_true", help="skip the non-default autotune configs "
                   "(KERNELS entries with sweep=True)")
    p.add_argument("--no-triton", dest="triton", action="store_false", help="skip the Triton kernels")
    p.add_argument("--no-cuda", dest="cuda", action="store_false", help="skip the CUDA extension")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--strict", dest="strict", action="store_true", default=True,
                   help="exit 1 on missing CUDA kernels, compile errors or spills (default)")
    g.add_argument("--no-strict", dest="strict", action="store_false", help="always exit 0")
    args = p.parse_args(argv)
    rows = report(archs=tuple(args.arch or (80, 90)), so_path=args.so, jobs=args.jobs,
                  triton=args.triton, cuda=args.cuda, quick=args.quick)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    fails = failures(rows)
    if fails:
        print(f"\n{len(fails)} problem(s):", file=sys.stderr)
        for line in fails:
            print("  " + line, file=sys.stderr)
    else:
        print("\nno problems")
    return 1 if (fails and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
