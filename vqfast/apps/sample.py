"""``python -m vqfast sample --prior RUN_DIR --n 16``: images drawn from a code prior, as a PNG grid.

Codes are sampled autoregressively (temperature, top-k, nucleus top-p, with the key/value cache
unless ``--no-cache``) and decoded by the tokenizer the prior was trained on.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from vqfast.apps.codes import decode_sequences, load_prior


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqfast sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prior", required=True, help="run directory of `python -m vqfast train-prior`")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the grid PNG")
    p.add_argument("-o", "--output", default=None, help="PNG (default: PRIOR/samples.png)")
    return p


def sample_images(prior, tokenizer, grid, n: int, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                  seed=0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(images in [0, 1], codes, seconds spent sampling codes)``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"sample: n must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    codes = prior.sample(n, temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache, generator=g)
    seconds = time.perf_counter() - t0
    return decode_sequences(tokenizer, codes, grid), codes, seconds


def save_sample_grid(path: str, images: torch.Tensor, scale: int = 4) -> None:
    from torchvision.utils import save_image
    x = images.float()
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    save_image(x, path, nrow=int(math.ceil(math.sqrt(x.shape[0]))), padding=2, pad_value=1.0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.scale < 1:
        raise ValueError(f"sample: --scale must be >= 1, got {args.scale}")
    prior, config, tokenizer, _ = load_prior(args.prior)
    images, _, seconds = sample_images(prior, tokenizer, tuple(config["grid"]), args.n,
                                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                       use_cache=not args.no_cache, seed=args.seed)
    out = args.output or os.path.join(args.prior, "samples.png")
    save_sample_grid(out, images, args.scale)
    print(f"{args.n} samples of {prior.seq_len} codes in {seconds:.2f} s ({args.n / seconds:.1f} samples/s, "
          f"{'with' if not args.no_cache else 'without'} KV cache) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
