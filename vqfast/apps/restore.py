"""``python -m vqfast restore --task denoise|superres [IMAGE]``: image restoration through a tokenizer's codes.

* denoise: encode the noisy image and decode its quantized codes. The codebook holds patches of
  clean photographs, so quantization snaps noisy patches back towards clean ones (any tokenizer
  from ``python -m vqfast train``).
* superres: a tokenizer whose encoder sees the bicubic-upsampled low-resolution image and whose
  decoder is trained to the high-resolution one, ``python -m vqfast train-superres --scale 2|4``
  (the same VQ-VAE and options as ``train``; the scale is kept in its config). The decoder predicts
  the detail the bicubic image lacks (output = bicubic input + decoded codes), as super-resolution
  networks do: the codes then carry only the high frequencies, and an untrained detail is ~0 rather
  than a worse copy of the image.

Without IMAGE, the command measures on the held-out crops of the data set: PSNR/SSIM of the
input (noisy, or bicubic) and of the restored image against the clean one, as a table, and a
side-by-side PNG (clean | input | restored). With IMAGE it restores that file (``--reference``
gives PSNR against a clean original; ``--add-noise`` makes a noisy input from a clean IMAGE).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from vqfast import codec
from vqfast.apps.codes import held_out_crops, load_tokenizer
from vqfast.metrics import forward_with_indices, psnr, ssim

TASKS = ("denoise", "superres")


# -- degradations --------------------------------------------------------------------------------------


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] plus Gaussian noise of standard deviation ``sigma``, clamped to [0, 1]."""
    if not sigma > 0:
        raise ValueError(f"restore: sigma must be > 0, got {sigma}")
    g = torch.Generator().manual_seed(seed)
    return (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)


def bicubic_input(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The super-resolution input: ``hr`` shrunk by ``scale`` (antialiased bicubic), then bicubic back up."""
    if scale not in (2, 4):
        raise ValueError(f"restore: scale must be 2 or 4, got {scale}")
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"restore: image size {h}x{w} must be a multiple of the scale {scale}")
    lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return upsample(lr, scale)


def upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


@torch.no_grad()
def through_codes(model, images: torch.Tensor, batch_size: int = 64, residual: bool = False) -> torch.Tensor:
    """Images in [0, 1] (sides multiples of the downsample factor) encoded, quantized, decoded
    (``residual``: the decoded codes are the detail added to the input, the super-resolution model)."""
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size] * 2 - 1
        xrec, _, _ = forward_with_indices(model, x)
        y = x + xrec.float() if residual else xrec.float()
        out.append(((y + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def restoration_table(model, clean: torch.Tensor, task: str, *, sigma: float = 0.1, scale: int = 2,
                      seed: int = 0, residual: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``({"input": {psnr_db, ssim}, "restored": {...}}, degraded, restored)`` on clean images in [0, 1]."""
    if task not in TASKS:
        raise ValueError(f"restore: task must be one of {TASKS}, got {task!r}")
    degraded = add_noise(clean, sigma, seed) if task == "denoise" else bicubic_input(clean, scale)
    restored = through_codes(model, degraded, residual=residual)
    row = {name: {"psnr_db": psnr(x, clean), "ssim": ssim(x, clean)}
           for name, x in (("input", degraded), ("restored", restored))}
    return row, degraded, restored


def save_side_by_side(path: str, clean, degraded, restored, n: int = 8, scale: int = 3) -> None:
    """Rows of (clean | input | restored) triples."""
    from torchvision.utils import save_image
    n = min(n, clean.shape[0])
    triples = torch.stack([clean[:n], degraded[:n], restored[:n]], 1).flatten(0, 1)
    save_image(F.interpolate(triples.float(), scale_factor=scale, mode="nearest"), path, nrow=6, padding=2,
               pad_value=1.0)


def print_restore_table(rows: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for col in ("task", "input PSNR", "restored PSNR", "gain", "input SSIM", "restored SSIM"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for task, r in rows.items():
        i, o = r["input"], r["restored"]
        t.add_row(task, f"{i['psnr_db']:.2f} dB", f"{o['psnr_db']:.2f} dB", f"{o['psnr_db'] - i['psnr_db']:+.2f} dB",
                  f"{i['ssim']:.4f}", f"{o['ssim']:.4f}")
    Console().print(t)


# -- super-resolution tokenizer -----------------------------------------------------------------------


def build_superres_parser() -> argparse.ArgumentParser:
    from vqfast.train import build_parser
    p = build_parser()
    p.prog = "python -m vqfast train-superres"
    p.description = ("Train a super-resolution tokenizer: the VQ-VAE's encoder sees the bicubic-upsampled "
                     "low-resolution crop, its decoder is trained (MSE + quantizer loss) to the high-resolution one.")
    p.add_argument("--scale", type=int, choices=(2, 4), default=2)
    p.set_defaults(out="runs/superres", image_every=10**9)
    return p


def train_superres(args) -> dict:
    """Train as ``args`` says (``train``'s options plus ``--scale``); returns the held-out restoration table."""
    from vqfast import checkpoint
    from vqfast import data as datasets
    from vqfast.train import CHECKPOINT_DIR, Progress, _check_args, build_model, model_config, set_backend
    _check_args(args)
    if args.model != "vqvae" or args.loss not in ("auto", "mse"):
        raise NotImplementedError("train-superres: only --model vqvae with the MSE loss")
    if args.crop_size % args.scale:
        raise ValueError(f"train-superres: --crop-size ({args.crop_size}) must be a multiple of --scale ({args.scale})")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = datasets.load(args.data, args.crop_size, args.held_out)
    kind, cfg = model_config(args, data.channels)
    model = build_model(kind, cfg)
    set_backend(model, args.backend)
    lr = args.lr if args.lr is not None else 2e-4
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    config = {"model": kind, "model_config": cfg, "loss": "mse", "data": data.name, "crop_size": data.crop_size,
              "superres_scale": args.scale, "superres_residual": True,
              "train": {k: v for k, v in vars(args).items() if k not in ("resume", "init")}}
    ckpt = os.path.join(args.out, CHECKPOINT_DIR)
    start = 0
    if args.resume:
        start, _, _ = checkpoint.load_training_state(ckpt, model=model, optimizers={"generator": opt})
    os.makedirs(args.out, exist_ok=True)
    progress = Progress(args.steps, start, True, args.no_progress or not sys.stdout.isatty(), args.log_every)
    seconds = 0.0
    model.train()
    try:
        for step in range(start, args.steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / args.steps)) if args.lr_decay == "cosine" else lr
            hr = data.batch(args.batch_size, args.seed, step)
            x = bicubic_input(hr, args.scale) * 2 - 1
            xrec, qloss, _ = forward_with_indices(model, x)
            loss = F.mse_loss(x + xrec.float(), hr * 2 - 1) + qloss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seconds += time.perf_counter() - t0
            progress.update(step + 1, {"loss": f"{float(loss.detach()):.4f}"})
            if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
                checkpoint.save_training_state(ckpt, model=model, optimizers={"generator": opt}, step=step + 1,
                                               config=config)
    finally:
        progress.close()
    checkpoint.save_training_state(ckpt, model=model, optimizers={"generator": opt}, step=max(args.steps, start),
                                   config=config)
    clean = held_out_crops(args.data, args.crop_size, args.held_out)
    row, degraded, restored = restoration_table(model, clean, "superres", scale=args.scale, residual=True)
    save_side_by_side(os.path.join(args.out, "superres.png"), clean, degraded, restored)
    metrics = {f"superres_x{args.scale}": row, "train_seconds": seconds, "steps": args.steps}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def train_superres_main(argv=None) -> int:
    args = build_superres_parser().parse_args(argv)
    m = train_superres(args)
    print_restore_table({f"superres x{args.scale}": m[f"superres_x{args.scale}"]},
                        f"held-out crops, {args.steps} steps -> {args.out}")
    print(f"wrote {args.out}/checkpoint/, superres.png, metrics.json")
    return 0


# -- the command ---------------------------------------------------------------------------------------


def _image01(path: str) -> torch.Tensor:
    return codec._load_image(path, 3)[None].float() / 255


def _restore_file(model, config, args) -> None:
    x = _image01(args.image)
    reference = None
    if args.task == "denoise":
        if args.add_noise:
            reference, x = x, add_noise(x, args.add_noise, args.seed)
    else:
        scale = config.get("superres_scale")
        x = upsample(x, scale)
    if args.reference:
        reference = _image01(args.reference)
    # Whole images through the codec's path: padded (edge replicate) to the code grid, cropped back.
    img = (x[0] * 255).round().to(torch.uint8)
    restored = codec.codes_to_image(model, codec.image_to_codes(model, img), img.shape[1], img.shape[2])
    if args.task == "superres" and config.get("superres_residual"):  # decoded codes = detail over the input
        detail = restored.float() / 255 * 2 - 1  # the decoder's output, in the [-1, 1] image scale
        restored = ((img.float() / 255 + detail / 2).clamp(0, 1) * 255).round().to(torch.uint8)
    out = args.output or os.path.splitext(args.image)[0] + f"_{args.task}.png"
    codec._save_image(out, restored)
    msg = f"{args.image} -> {out} ({restored.shape[2]}x{restored.shape[1]})"
    if reference is not None:
        if reference.shape[-2:] != restored.shape[-2:]:
            raise ValueError(f"restore: --reference is {tuple(reference.shape[-2:])}, the output "
                             f"{tuple(restored.shape[-2:])}")
        r = restored[None].float() / 255
        msg += (f": PSNR input {psnr(img[None].float() / 255, reference):.2f} dB -> restored "
                f"{psnr(r, reference):.2f} dB")
    print(msg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqfast restore", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("image", nargs="?", help="image to restore (default: measure on the held-out crops)")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--tokenizer", required=True,
                   help="denoise: a `train` run; superres: a `train-superres` run")
    p.add_argument("--sigma", type=float, default=0.1, help="noise level of the held-out measurement")
    p.add_argument("--add-noise", type=float, default=None, help="denoise IMAGE after adding this much noise")
    p.add_argument("--reference", default=None, help="clean image: PSNR of input and output against it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=int, default=256)
    p.add_argument("-o", "--output", default=None, help="restored image, or the side-by-side PNG without IMAGE")
    args = p.parse_args(argv)
    model, config = load_tokenizer(args.tokenizer)
    scale = config.get("superres_scale")
    if args.task == "superres" and not scale:
        raise ValueError(f"restore: {args.tokenizer!r} is not a super-resolution tokenizer (train one with "
                         f"`python -m vqfast train-superres --scale 2`)")
    if args.image:
        _restore_file(model, config, args)
        return 0
    clean = held_out_crops(config["train"].get("data", "embedded"), int(config["crop_size"]), args.held_out)
    row, degraded, restored = restoration_table(model, clean, args.task, sigma=args.sigma, scale=scale or 2,
                                                seed=args.seed,
                                                residual=args.task == "superres" and bool(config.get("superres_residual")))
    label = f"denoise sigma={args.sigma}" if args.task == "denoise" else f"superres x{scale}"
    print_restore_table({label: row}, f"{clean.shape[0]} held-out crops, against the clean image")
    out = args.output or os.path.join(args.tokenizer, f"restore_{args.task}.png")
    save_side_by_side(out, clean, degraded, restored)
    print(f"wrote {out} (clean | input | restored)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
