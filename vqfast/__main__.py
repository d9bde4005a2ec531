"""``python -m vqfast {bench, kernels-report, info}``."""
from __future__ import annotations

import sys

COMMANDS = {
    "bench": ("vqfast.bench", "time the kernels against the peers and print the table"),
    "kernels-report": ("vqfast.kernels_report", "static GPU report: registers, spills, shared memory, tensor cores"),
    "info": (None, "versions and backend status"),
}


def info() -> int:
    import torch

    import vqfast

    print(f"vqfast {vqfast.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"threads {torch.get_num_threads()}")
    for st in vqfast.backends().values():
        print(f"  {st}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m vqfast COMMAND [args]\n\ncommands:")
        for name, (_, what) in COMMANDS.items():
            print(f"  {name:15s} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, _ = COMMANDS[argv[0]]
    if module is None:
        return info()
    import importlib

    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
