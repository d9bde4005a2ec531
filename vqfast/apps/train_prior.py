"""``python -m vqfast train-prior --tokenizer RUN_DIR``: an autoregressive prior over a tokenizer's codes.

The tokenizer (a ``python -m vqfast train`` run) encodes ``--num-crops`` training crops once, under
``torch.no_grad`` with vqfast's fused nearest-code kernels, and the held-out crops of the same data
set; the code sequences are cached in ``OUT/codes.safetensors``. A ``CodePrior`` is then trained on
them with Adam (cross-entropy, cosine-decayed learning rate), batches drawn from a generator seeded
by ``(seed, step)`` so ``--resume`` continues exactly. Reported: held-out negative log-likelihood in
bits per code beside log2(K) (uniform codes) and the empirical unigram entropy of the codes, and
samples/s with and without the key/value cache.

Writes ``OUT/checkpoint/`` (``model.safetensors``, ``config.json``, ``training_state.pt``) and
``OUT/metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from vqfast.apps.codes import PRIOR_KIND, image_codes, load_tokenizer, unigram_entropy_bits
from vqfast.metrics import codebook_size_of

CODES_FILE = "codes.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqfast train-prior", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="run directory of `python -m vqfast train`")
    p.add_argument("--out", default=None, help="default: TOKENIZER/prior")
    p.add_argument("--data", default=None, help="data set spec (default: the one the tokenizer trained on)")
    p.add_argument("--num-crops", type=int, default=4096, help="training crops encoded once")
    p.add_argument("--held-out", type=int, default=256, help="held-out crops for the validation NLL")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay", choices=("none", "cosine"), default="cosine",
                   help="cosine: anneal to a tenth of --lr over --steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--bench-samples", type=int, default=8, help="samples timed with and without the KV cache "
                                                                 "(0: skip)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args) -> None:
    for name in ("num_crops", "held_out", "dim", "depth", "heads", "batch_size", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"train-prior: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps < 0 or args.bench_samples < 0:
        raise ValueError("train-prior: --steps and --bench-samples must be >= 0")
    if args.lr <= 0:
        raise ValueError(f"train-prior: --lr must be > 0, got {args.lr}")


def compute_codes(tokenizer, tok_config: dict, data_spec: str | None, num_crops: int, held_out: int, seed: int):
    """Training and held-out code sequences of the tokenizer's data set, and the grid."""
    from vqfast import data as datasets
    spec = data_spec or tok_config.get("train", {}).get("data") or "embedded"
    data = datasets.load(spec, int(tok_config["crop_size"]), held_out)
    crops = torch.cat([data.batch(min(512, num_crops - i), seed, 1_000_000 + i // 512)
                       for i in range(0, num_crops, 512)])
    train_codes, grid = image_codes(tokenizer, crops)
    val_codes, _ = image_codes(tokenizer, data.held_out)
    return train_codes, val_codes, grid, data.name


def _load_or_compute_codes(args, out, tokenizer, tok_config):
    from safetensors.torch import load_file, save_file
    path = os.path.join(out, CODES_FILE)
    if args.resume and os.path.isfile(path):
        t = load_file(path)
        return t["train"], t["val"], tuple(int(g) for g in t["grid"]), None
    t0 = time.perf_counter()
    train_codes, val_codes, grid, name = compute_codes(tokenizer, tok_config, args.data, args.num_crops,
                                                       args.held_out, args.seed)
    print(f"codes of {train_codes.shape[0]} training and {val_codes.shape[0]} held-out crops ({name}), grid "
          f"{grid[0]}x{grid[1]}x{grid[2]}: {time.perf_counter() - t0:.1f} s", flush=True)
    os.makedirs(out, exist_ok=True)
    save_file({"train": train_codes.contiguous(), "val": val_codes.contiguous(), "grid": torch.tensor(grid)}, path)
    return train_codes, val_codes, grid, name


@torch.no_grad()
def mean_bits_per_code(prior, codes: torch.Tensor, batch_size: int = 256) -> float:
    was_training = prior.training
    prior.eval()
    total = 0.0
    for i in range(0, codes.shape[0], batch_size):
        c = codes[i:i + batch_size]
        total += float(prior.loss(c)) * c.shape[0]
    prior.train(was_training)
    return total / codes.shape[0] / math.log(2)


def sampling_speed(prior, n: int, seed: int = 0) -> dict:
    """Samples/s of ``prior.sample`` with the key/value cache and recomputing the prefix every step."""
    out = {}
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        prior.sample(n, use_cache=use_cache, generator=g)
        out["samples_per_s_cache" if use_cache else "samples_per_s_no_cache"] = n / (time.perf_counter() - t0)
    return out


def train_prior(args) -> dict:
    from vqfast import checkpoint
    from vqfast.codec import model_id
    from vqfast.models.prior import CodePrior
    from vqfast.train import Progress
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, tok_config = load_tokenizer(args.tokenizer)
    out = args.out or os.path.join(args.tokenizer, "prior")
    k = codebook_size_of(tokenizer)
    train_codes, val_codes, grid, _ = _load_or_compute_codes(args, out, tokenizer, tok_config)

    torch.manual_seed(args.seed)
    prior = CodePrior(k, train_codes.shape[1], dim=args.dim, depth=args.depth, heads=args.heads,
                      dropout=args.dropout)
    opt = torch.optim.Adam(prior.parameters(), lr=args.lr, betas=(0.9, 0.95))
    config = {"kind": PRIOR_KIND, "prior": prior.config, "tokenizer": os.path.abspath(args.tokenizer),
              "tokenizer_id": model_id(tokenizer, tok_config).hex(), "grid": list(grid),
              "crop_size": int(tok_config["crop_size"]),
              "train": {k_: v for k_, v in vars(args).items() if k_ != "resume"}}
    ckpt = os.path.join(out, "checkpoint")
    start = 0
    if args.resume:
        start, _, _ = checkpoint.load_training_state(ckpt, model=prior, optimizers={"prior": opt})

    def lr_at(step):
        if args.lr_decay == "none":
            return args.lr
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(args.steps, 1))))

    progress = Progress(args.steps, start, True, args.no_progress or not sys.stdout.isatty(), args.log_every)
    prior.train()
    t_train, loss = 0.0, float("nan")
    try:
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            batch = train_codes[torch.randint(train_codes.shape[0], (args.batch_size,), generator=g)]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss_t = prior.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            opt.step()
            t_train += time.perf_counter() - t0
            loss = float(loss_t.detach()) / math.log(2)
            progress.update(step + 1, {"bits/code": f"{loss:.3f}", "seq/s": f"{(step + 1 - start) * args.batch_size / t_train:.0f}"})
            if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
                checkpoint.save_training_state(ckpt, model=prior, optimizers={"prior": opt}, step=step + 1,
                                               config=config)
    finally:
        progress.close()
    checkpoint.save_training_state(ckpt, model=prior, optimizers={"prior": opt}, step=max(args.steps, start),
                                   config=config)
    prior.eval()
    train_hist = torch.bincount(train_codes.reshape(-1), minlength=k).double() + 1   # add-one smoothing
    unigram_model = float(-(train_hist / train_hist.sum()).log2()[val_codes.reshape(-1)].mean())
    metrics = {
        "val_bits_per_code": mean_bits_per_code(prior, val_codes),
        "train_bits_per_code": mean_bits_per_code(prior, train_codes[:1024]),
        "log2_K": math.log2(k),
        "unigram_entropy_bits": unigram_entropy_bits(val_codes, k),
        "unigram_model_bits": unigram_model,
        "codes_per_image": int(train_codes.shape[1]), "codebook_size": k,
        "crop_size": int(tok_config["crop_size"]), "steps": args.steps, "train_seconds": t_train,
        "train_sequences": int(train_codes.shape[0]), "val_sequences": int(val_codes.shape[0]),
        "parameters": sum(p.numel() for p in prior.parameters()),
    }
    metrics["val_bpp"] = metrics["val_bits_per_code"] * metrics["codes_per_image"] / metrics["crop_size"] ** 2
    if args.bench_samples:
        metrics.update(sampling_speed(prior, args.bench_samples, args.seed))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    metrics["out"] = out
    return metrics


def print_prior_table(m: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("held-out NLL of the prior", f"{m['val_bits_per_code']:.3f} bits/code")
    t.add_row("training NLL (1024 sequences)", f"{m['train_bits_per_code']:.3f} bits/code")
    t.add_row("uniform codes, log2 K", f"{m['log2_K']:.3f} bits/code")
    t.add_row("unigram entropy of the held-out codes", f"{m['unigram_entropy_bits']:.3f} bits/code")
    t.add_row("unigram model (training histogram) on held-out", f"{m['unigram_model_bits']:.3f} bits/code")
    t.add_row("held-out rate with the prior", f"{m['val_bpp']:.3f} bits/pixel")
    if "samples_per_s_cache" in m:
        t.add_row("sampling with KV cache", f"{m['samples_per_s_cache']:.1f} samples/s")
        t.add_row("sampling without cache", f"{m['samples_per_s_no_cache']:.1f} samples/s")
    t.add_row("training time", f"{m['train_seconds']:.0f} s ({m['steps']} steps)")
    Console().print(t)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    m = train_prior(args)
    print_prior_table(m, f"CodePrior ({m['parameters'] / 1e6:.2f} M parameters) on {m['codes_per_image']} codes "
                         f"of K={m['codebook_size']}")
    print(f"wrote {m['out']}/checkpoint/, metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
