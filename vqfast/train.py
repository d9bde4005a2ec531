"""``python -m vqfast train``: train a VQ-VAE or VQ-GAN on images.

Defaults follow the references: Adam with betas (0.5, 0.9) for generator and discriminator
(taming-transformers), hinge discriminator loss, taming's adaptive generator weight (clamped to
[0, 1e4], in :class:`vqfast.losses.VQGANLoss`), the discriminator joining after ``--disc-start``
steps. ``--model vqvae`` trains with the VQ-VAE paper's loss (MSE + quantizer loss) unless
``--loss vqgan`` asks for the adversarial objective.

Writes into ``--out``: ``checkpoint/`` (``model.safetensors``, ``config.json``,
``training_state.pt``, see :mod:`vqfast.checkpoint`), ``tb/`` (TensorBoard),
``recon_<step>.png`` grids (held-out originals above their reconstructions), ``usage.png`` (code
histogram) and ``metrics.json``. ``--resume`` continues from ``OUT/checkpoint``; batches depend
only on ``(seed, step, rank)`` and every RNG is restored, so on CPU a resumed run is bit-identical
to an uninterrupted one. Under ``torchrun`` each process trains on its own batches with DDP (gloo
on CPU, nccl on GPU) and the EMA codebook statistics are all-reduced (``sync_codebook``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from vqfast import data as datasets
from vqfast.checkpoint import CHECKPOINT_DIR
from vqfast.metrics import (bits_per_pixel, codebook_size_of, downsample_factor, forward_with_indices, psnr,
                            reconstruction_metrics)
from vqfast.ops.codebook import codebook_stats

# Taming's base learning rate, scaled by the global batch size (main.py: base_lr * ngpu * bs).
TAMING_BASE_LR = 4.5e-6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqfast train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("vqvae", "vqgan"), default="vqvae")
    p.add_argument("--loss", choices=("auto", "mse", "vqgan"), default="auto",
                   help="auto: mse for vqvae (the VQ-VAE paper), vqgan (L1 + PatchGAN) for vqgan")
    p.add_argument("--data", default="embedded",
                   help="'embedded' (photographs shipped in scikit-image/scikit-learn), an image folder, "
                        "or cifar10:ROOT / mnist:ROOT (torchvision's files, never downloaded)")
    p.add_argument("--crop-size", type=int, default=32)
    p.add_argument("--held-out", type=int, default=256, help="held-out crops for the final metrics")
    # model sizes
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--res-channels", type=int, default=64, help="VQ-VAE residual branch width")
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--downsample", type=int, default=4, help="pixels per code along each side (power of 2)")
    p.add_argument("--ch-mult", default=None, help="VQ-GAN channel multipliers, e.g. 1,2,2 (default: from "
                                                   "--downsample)")
    # codebook
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--codebook-dim", type=int, default=64)
    p.add_argument("--quantizer", choices=("ema", "learnable", "cosine", "residual"), default="ema")
    p.add_argument("--num-quantizers", type=int, default=1, help="stages of --quantizer residual")
    p.add_argument("--decay", type=float, default=0.99, help="EMA decay")
    p.add_argument("--commitment-weight", type=float, default=0.25)
    p.add_argument("--dead-code-threshold", type=float, default=2.0,
                   help="restart codes whose EMA cluster size falls below this (EMA quantizers)")
    p.add_argument("--backend", default=None, help="vqfast backend of the quantizer ops (torch/cpu/cuda/triton)")
    # optimisation
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 2e-4 for vqvae (the VQ-VAE paper), 4.5e-6 x global batch for vqgan (taming)")
    p.add_argument("--lr-decay", choices=("none", "cosine"), default="none",
                   help="cosine: anneal the learning rate to a tenth over --steps")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    # GAN
    p.add_argument("--disc-start", type=int, default=0, help="step at which the discriminator joins")
    p.add_argument("--disc-weight", type=float, default=0.8, help="taming's disc_weight")
    p.add_argument("--disc-layers", type=int, default=2)
    p.add_argument("--disc-ndf", type=int, default=64)
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="LPIPS weight; needs --lpips-weights (nothing is downloaded)")
    p.add_argument("--lpips-weights", default=None, help="a full LPIPS state dict (vgg + lin layers)")
    # output
    p.add_argument("--out", default="runs/vqvae")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--init", default=None, help="start from the weights of this checkpoint directory (fine-tune)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--image-every", type=int, default=500, help="reconstruction grid PNG every N steps")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the progress bar")
    p.add_argument("--no-tensorboard", action="store_true")
    return p


# -- models ------------------------------------------------------------------------------------------


def model_config(args, channels: int) -> tuple[str, dict]:
    if args.model == "vqvae":
        return "vqvae", dict(in_channels=channels, channels=args.channels, res_channels=args.res_channels,
                             num_res_blocks=args.num_res_blocks, downsample=args.downsample,
                             codebook_size=args.codebook_size, embed_dim=args.codebook_dim,
                             quantizer=args.quantizer, num_quantizers=args.num_quantizers, decay=args.decay,
                             commitment_weight=args.commitment_weight,
                             threshold_ema_dead_code=args.dead_code_threshold)
    quantizer = {"learnable": "taming", "ema": "ema", "cosine": "cosine"}.get(args.quantizer)
    if quantizer is None:
        raise NotImplementedError(f"train: --quantizer {args.quantizer} with --model vqgan (VQGAN takes "
                                  f"learnable (taming), ema or cosine)")
    if args.ch_mult:
        ch_mult = [int(c) for c in args.ch_mult.split(",")]
    else:
        levels = int(math.log2(args.downsample))
        ch_mult = [1] + [2] * levels
    return "vqgan", dict(ch=args.channels, ch_mult=ch_mult, num_res_blocks=args.num_res_blocks,
                         attn_resolutions=[], dropout=0.0, resolution=args.crop_size, in_channels=channels,
                         out_ch=channels, z_channels=args.codebook_dim, double_z=False,
                         n_embed=args.codebook_size, embed_dim=args.codebook_dim, quantizer=quantizer,
                         beta=args.commitment_weight, decay=args.decay,
                         norm_groups=math.gcd(32, args.channels))


def build_model(kind: str, config: dict) -> torch.nn.Module:
    if kind == "vqvae":
        from vqfast.models.vqvae import VQVAE
        return VQVAE(**config)
    if kind == "vqgan":
        from vqfast.models.vqgan import VQGAN
        return VQGAN(**config)
    raise ValueError(f"build_model: kind must be 'vqvae' or 'vqgan', got {kind!r}")


def load_model(path: str, device: str = "cpu"):
    """``(model, config)`` from a checkpoint directory (or the ``--out`` directory above it)."""
    from vqfast import checkpoint
    directory, config = checkpoint.read_run_config(
        path, "load_model", "pass the --out directory of `python -m vqfast train` or its checkpoint/ folder")
    model_cfg = dict(config["model_config"])
    if config["model"] == "vqvae":
        model_cfg["sync_codebook"] = False       # a single process reading the weights
    model = build_model(config["model"], model_cfg)
    checkpoint.load_into(model, os.path.join(directory, checkpoint.MODEL_FILE))
    return model.to(device).eval(), config


def set_backend(model: torch.nn.Module, backend: str | None) -> None:
    if backend is None:
        return
    import vqfast
    if backend not in vqfast.backends():
        raise ValueError(f"train: --backend must be one of {sorted(vqfast.backends())}, got {backend!r}")
    for m in model.modules():
        if hasattr(m, "backend") and not isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m.backend = backend


# -- outputs -----------------------------------------------------------------------------------------


def save_grid(path: str, originals: torch.Tensor, reconstructions: torch.Tensor, per_row: int = 8) -> None:
    """Rows of originals, each followed by the row of their reconstructions."""
    from torchvision.utils import save_image
    n = (originals.shape[0] // per_row) * per_row or originals.shape[0]
    rows = []
    for i in range(0, n, per_row):
        rows += [originals[i:i + per_row], reconstructions[i:i + per_row]]
    save_image(torch.cat(rows).float().clamp(0, 1), path, nrow=min(per_row, n), padding=1, pad_value=1.0)


def save_usage_plot(path: str, counts: torch.Tensor, title: str) -> None:
    """Bar chart of how often each code was chosen (code index on x, sorted by count), drawn with Pillow."""
    from PIL import Image, ImageDraw
    counts = counts.double().sort(descending=True).values
    k = counts.numel()
    bar = max(1, min(4, 1024 // k))
    width, height, top, left = max(k * bar, 256) + 20, 240, 30, 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black")
    peak = float(counts.max()) or 1.0
    base = height - 10
    for i, c in enumerate(counts.tolist()):
        h = int(round((base - top) * c / peak))
        x0 = left + i * bar
        if h:
            draw.rectangle([x0, base - h, x0 + bar - 1, base], fill=(40, 90, 170) if c else (200, 60, 60))
    draw.line([left, base, left + k * bar, base], fill="black")
    img.save(path)


def print_table(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    labels = {"psnr_db": ("PSNR (held-out)", "{:.2f} dB"), "ssim": ("SSIM (held-out)", "{:.4f}"),
              "codebook_usage_pct": ("codebook usage", "{:.1f} %"), "perplexity": ("perplexity", "{:.1f}"),
              "bpp": ("bits/pixel (fixed-length codes)", "{:.4f}"),
              "bpp_entropy": ("bits/pixel (entropy of codes)", "{:.4f}"),
              "photo_psnr_db": ("PSNR (whole held-out photo)", "{:.2f} dB"),
              "images_per_s": ("training images/s", "{:.1f}"), "held_out_images": ("held-out crops", "{}"),
              "steps": ("steps", "{}"), "train_seconds": ("training time", "{:.0f} s")}
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, (label, fmt) in labels.items():
        if key in metrics:
            table.add_row(label, fmt.format(metrics[key]))
    Console().print(table)


# -- distributed -------------------------------------------------------------------------------------


def init_distributed():
    """``(rank, world_size, device)``; a process group only when launched by torchrun with >1 process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), world, device


# -- the loop ----------------------------------------------------------------------------------------


class Progress:
    """rich progress bar with live fields, or plain lines every ``log_every`` steps."""

    def __init__(self, total: int, start: int, enabled: bool, plain: bool, log_every: int):
        self.enabled, self.plain, self.log_every = enabled, plain, log_every
        self.bar = None
        if enabled and not plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn
            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        info = " ".join(f"{k} {v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.log_every == 0:
            print(f"step {step}: {info}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "crop_size", "codebook_size", "codebook_dim", "channels", "log_every",
                 "image_every", "checkpoint_every", "held_out"):
        v = getattr(args, name)
        if v < (0 if name == "steps" else 1):
            raise ValueError(f"train: --{name.replace('_', '-')} must be >= {0 if name == 'steps' else 1}, got {v}")
    if args.crop_size % args.downsample:
        raise ValueError(f"train: --crop-size ({args.crop_size}) must be a multiple of --downsample "
                         f"({args.downsample})")
    if args.resume and args.init:
        raise ValueError("train: pass --resume or --init, not both")
    if args.perceptual_weight > 0 and not args.lpips_weights:
        raise ValueError("train: --perceptual-weight > 0 needs --lpips-weights (LPIPS weights are never downloaded)")


def train(args) -> dict:
    """Run training as configured by ``args`` (the parsed command line); returns the final metrics."""
    from vqfast import checkpoint
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = init_distributed()
    try:
        return _train(args, rank, world, device, checkpoint)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(args, rank, world, device, checkpoint) -> dict:
    torch.manual_seed(args.seed)
    main_process = rank == 0
    data = datasets.load(args.data, args.crop_size, args.held_out)
    kind, cfg = model_config(args, data.channels)
    if kind == "vqvae" and world > 1:
        cfg["sync_codebook"] = True
    model = build_model(kind, cfg).to(device)
    set_backend(model, args.backend)
    loss_kind = ("mse" if kind == "vqvae" else "vqgan") if args.loss == "auto" else args.loss

    gan = None
    if loss_kind == "vqgan":
        from vqfast.losses import VQGANLoss
        lpips_sd = checkpoint.load_state_dict(args.lpips_weights) if args.lpips_weights else None
        gan = VQGANLoss(disc_start=args.disc_start, codebook_weight=1.0, pixel_loss="l1",
                        perceptual_weight=args.perceptual_weight, lpips_weights=lpips_sd,
                        disc_num_layers=args.disc_layers, disc_in_channels=data.channels,
                        disc_weight=args.disc_weight, disc_loss="hinge", disc_ndf=args.disc_ndf).to(device)

    lr = args.lr if args.lr is not None else (2e-4 if kind == "vqvae" else TAMING_BASE_LR * args.batch_size * world)
    optimizers = {"generator": torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))}
    if gan is not None:
        optimizers["discriminator"] = torch.optim.Adam(gan.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))

    config = {"model": kind, "model_config": cfg, "loss": loss_kind, "data": data.name, "crop_size": data.crop_size,
              "train": {k: v for k, v in vars(args).items() if k not in ("resume", "init")}}
    ckpt_dir = os.path.join(args.out, CHECKPOINT_DIR)
    start = 0
    if args.resume:
        start, _, extra = checkpoint.load_training_state(ckpt_dir, model=model, optimizers=optimizers)
        if gan is not None:
            gan.load_state_dict(extra["loss"])
    elif args.init:
        init_dir, _ = checkpoint.read_run_config(args.init, "--init", "pass the --out directory of a training run")
        checkpoint.load_into(model, os.path.join(init_dir, checkpoint.MODEL_FILE))
        torch.manual_seed(args.seed)  # the same randomness whether or not the weights came from a file

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # With sync_codebook the layers all-reduce their own EMA statistics, so every process computes
        # the same codebook; DDP's broadcast of rank 0's buffers would only hide a divergence.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=not cfg.get("sync_codebook", False))
    forward = torch.compile(net) if args.compile else net

    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    writer = None
    if main_process:
        os.makedirs(args.out, exist_ok=True)
        if not args.no_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(args.out, "tb"), purge_step=start)
    progress = Progress(args.steps, start, main_process, args.no_progress or not sys.stdout.isatty(), args.log_every)
    k = codebook_size_of(model)
    window_counts = torch.zeros(k, dtype=torch.long)
    images_seen, timed_seconds = 0, 0.0
    loss_val = psnr_val = float("nan")

    def lr_at(step: int) -> float:
        # To a tenth, not to zero: the EMA codebook keeps moving at any learning rate, and a frozen
        # decoder then decodes the drifted codes with shifted colours.
        cosine = 0.5 * (1 + math.cos(math.pi * step / max(args.steps, 1)))
        return lr * (0.1 + 0.9 * cosine) if args.lr_decay == "cosine" else lr

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def backward_step(loss, opt):
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    step = start
    try:
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            for opt in optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
            x = data.batch(args.batch_size, args.seed, step, rank).to(device) * 2 - 1
            with autocast():
                xrec, qloss, indices = forward_with_indices(forward, x)
                if gan is None:
                    rec_loss = F.mse_loss(xrec.float(), x)
                    loss = rec_loss + qloss.float()
                    log = {"train/rec_loss": rec_loss.detach(), "train/quant_loss": qloss.detach()}
                else:
                    loss, log = gan(qloss, x, xrec, 0, step, last_layer=model.get_last_layer(), split="train")
            backward_step(loss, optimizers["generator"])
            if gan is not None:
                with autocast():
                    d_loss, d_log = gan(qloss.detach(), x, xrec.detach(), 1, step, split="train")
                if step >= args.disc_start:
                    backward_step(d_loss, optimizers["discriminator"])
                log.update(d_log)
            timed = time.perf_counter() - t0
            if step > start or args.steps - start == 1:  # the first step pays for k-means init / compile
                timed_seconds += timed
                images_seen += x.shape[0] * world

            if main_process:
                loss_val = float(loss.detach())
                psnr_val = psnr(((xrec.detach().float() + 1) / 2).clamp(0, 1), (x + 1) / 2)
                window_counts = (window_counts * 0.9).long() + torch.bincount(indices.reshape(-1).cpu(),
                                                                              minlength=k)
                usage = float((window_counts > 0).double().mean()) * 100
                ips = images_seen / timed_seconds if timed_seconds else float("nan")
                progress.update(step + 1, {"loss": f"{loss_val:.4f}", "psnr": f"{psnr_val:5.2f}dB",
                                           "usage": f"{usage:5.1f}%", "img/s": f"{ips:6.1f}"})
                if writer is not None and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
                    for name, v in log.items():
                        writer.add_scalar(name, float(v), step + 1)
                    writer.add_scalar("train/psnr", psnr_val, step + 1)
                    writer.add_scalar("train/codebook_usage_pct", usage, step + 1)
                    writer.add_scalar("train/perplexity", codebook_stats(indices.cpu(), k).perplexity, step + 1)
                    writer.add_scalar("train/images_per_s", ips, step + 1)
                    writer.add_scalar("train/lr", lr_at(step), step + 1)
                if (step + 1) % args.image_every == 0:
                    _save_recon_grid(model, data, args.out, step + 1)
            if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
                _save(checkpoint, ckpt_dir, model, optimizers, step + 1, config, gan, main_process)
        step = args.steps
    finally:
        progress.close()

    if world > 1:
        _check_replicas_agree(model)
    _save(checkpoint, ckpt_dir, model, optimizers, max(step, start), config, gan, main_process)
    if not main_process:
        return {}
    metrics, rec = reconstruction_metrics(model, data.held_out)
    metrics.update(images_per_s=images_seen / timed_seconds if timed_seconds else float("nan"),
                   steps=args.steps, train_seconds=timed_seconds, world_size=world, final_train_loss=loss_val,
                   final_train_psnr_db=psnr_val, data=data.name, crop_size=data.crop_size)
    n = min(32, rec.shape[0])
    save_grid(os.path.join(args.out, "recon_final.png"), data.held_out[:n], rec[:n])
    if data.held_out_photo is not None:
        metrics.update(_save_photo(model, data.held_out_photo, os.path.join(args.out, "recon_photo.png")))
    _, _, idx = _held_out_codes(model, data)
    save_usage_plot(os.path.join(args.out, "usage.png"), torch.bincount(idx.reshape(-1), minlength=k),
                    f"codes sorted by use on {data.held_out.shape[0]} held-out crops: "
                    f"{metrics['codebook_usage_pct']:.1f}% of {k} used, perplexity {metrics['perplexity']:.1f}")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if writer is not None:
        for key in ("psnr_db", "ssim", "codebook_usage_pct", "perplexity", "bpp"):
            writer.add_scalar(f"held_out/{key}", metrics[key], args.steps)
        writer.close()
    return metrics


def _check_replicas_agree(model) -> None:
    """DDP keeps parameters equal; the EMA codebooks are buffers, equal only if ``sync_codebook``
    all-reduced their statistics (and DDP's buffer broadcast did not hide a divergence). Compare a
    float64 checksum of every tensor across processes."""
    import torch.distributed as dist
    sums = torch.stack([t.detach().double().sum() for t in model.state_dict().values() if t.is_floating_point()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("train: the DDP processes ended with different weights or codebooks")


def _held_out_codes(model, data):
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        out = forward_with_indices(model, data.held_out[:256].to(device) * 2 - 1)
    model.train()
    return out[0], out[1], out[2].cpu()


def _save_photo(model, photo: torch.Tensor, path: str) -> dict:
    """A whole held-out photograph beside its reconstruction from its codes (the codec's path)."""
    from vqfast.codec import codes_to_image, image_to_codes
    from torchvision.utils import save_image
    f = downsample_factor(model)
    tokens = (photo.shape[1] // f) * (photo.shape[2] // f)
    if not hasattr(model, "downsample") and tokens > 64 * 64:
        # The VQ-GAN's mid-block attention is quadratic in the code grid: 33k codes took 85 s on CPU.
        from PIL import Image
        scale = (64 * 64 / tokens) ** 0.5
        size = (max(f, int(photo.shape[2] * scale)), max(f, int(photo.shape[1] * scale)))
        small = Image.fromarray(photo.permute(1, 2, 0).numpy()).resize(size, Image.BICUBIC)
        photo = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).contiguous()
    codes = image_to_codes(model, photo)
    rec = codes_to_image(model, codes, photo.shape[1], photo.shape[2])
    model.train()
    save_image(torch.stack([photo, rec]).float() / 255, path, nrow=2, padding=4, pad_value=1.0)
    return {"photo_psnr_db": psnr(rec[None].float() / 255, photo[None].float() / 255),
            "photo_bpp": bits_per_pixel(codes.numel(), codebook_size_of(model), photo.shape[1] * photo.shape[2])}


def _save_recon_grid(model, data, out, step) -> None:
    xrec, _, _ = _held_out_codes(model, data)
    n = min(32, xrec.shape[0])
    save_grid(os.path.join(out, f"recon_{step:06d}.png"), data.held_out[:n], ((xrec[:n].cpu() + 1) / 2).clamp(0, 1))


def _save(checkpoint, ckpt_dir, model, optimizers, step, config, gan, main_process) -> None:
    if main_process:
        extra = {"loss": gan.state_dict()} if gan is not None else None
        checkpoint.save_training_state(ckpt_dir, model=model, optimizers=optimizers, step=step, config=config,
                                       extra=extra)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    metrics = train(args)
    if metrics:
        print_table(metrics, f"{args.model} on {metrics['data']}, {args.steps} steps -> {args.out}")
        print(f"wrote {os.path.join(args.out, 'metrics.json')}, recon_final.png, recon_photo.png, usage.png, "
              f"checkpoint/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
