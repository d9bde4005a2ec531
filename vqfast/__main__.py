"""``python -m vqfast COMMAND``: benchmarks, the static GPU report, training, the applications (see COMMANDS)."""
from __future__ import annotations

import sys

COMMANDS = {
    "bench": ("vqfast.bench", "time the kernels against the peers and print the table"),
    "kernels-report": ("vqfast.kernels_report", "static GPU report: registers, spills, shared memory, tensor cores"),
    "info": (None, "versions and backend status"),
    "train": ("vqfast.train", "train a VQ-VAE / VQ-GAN (default: on the embedded photographs)"),
    "encode": ("vqfast.codec:encode_main", "image -> code file with a trained model, reports bits/pixel and PSNR"),
    "decode": ("vqfast.codec:decode_main", "code file -> image"),
    "demo": ("vqfast.demo", "train a VQ-VAE on CPU for a few minutes, metrics, grids, then a VQ-GAN fine-tune"),
    "train-prior": ("vqfast.apps.train_prior", "train an autoregressive CodePrior on a tokenizer's codes"),
    "sample": ("vqfast.apps.sample", "sample images from a trained prior, as a PNG grid"),
    "compress": ("vqfast.apps.compress:compress_main", "image -> file: code grid range-coded with the prior"),
    "decompress": ("vqfast.apps.compress:decompress_main", "compressed file -> image"),
    "rate-distortion": ("vqfast.apps.rate_distortion", "bpp / PSNR / SSIM of raw and prior-coded codes vs JPEG, WebP"),
    "restore": ("vqfast.apps.restore", "denoise or super-resolve an image through a tokenizer's codes"),
    "train-superres": ("vqfast.apps.restore:train_superres_main", "train a 2x/4x super-resolution tokenizer"),
    "eval": ("vqfast.apps.evaluate", "PSNR, SSIM, LPIPS, codebook usage, FID/IS of a trained tokenizer"),
    "demo-apps": ("vqfast.apps.demo", "prior, samples, compression, restoration on the embedded photos (CPU)"),
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

    module, _, function = module.partition(":")  # "module:function", or "module" for its main()
    return getattr(importlib.import_module(module), function or "main")(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
