"""``python -m vqfast eval RUN_DIR``: the metrics of a trained tokenizer on held-out images.

PSNR and SSIM (:mod:`vqfast.metrics`), codebook usage and perplexity, bits per pixel; LPIPS
when its weights are local files (``--lpips-weights``: a full LPIPS state dict, or the ``vgg.pth``
calibration layers with ``--vgg-weights``); FID and Inception Score of the reconstructions against
the originals when pytorch-fid's Inception weights are a local file (``--inception-weights`` or
$VQFAST_INCEPTION_WEIGHTS). Nothing is downloaded: without a weights file, a message names what to
provide and that metric is skipped. Prints a table and writes ``RUN_DIR/eval.json``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from vqfast.apps.codes import load_tokenizer
from vqfast.metrics import reconstruction_metrics

LPIPS_HELP = ("LPIPS skipped: it needs local weights: pass --lpips-weights PATH (a full LPIPS state dict, e.g. taming's "
              "loss.perceptual_loss entries, or LPIPS v0.1 vgg.pth with --vgg-weights vgg16-397923af.pth)")


def lpips_or_none(lpips_weights: str | None, vgg_weights: str | None):
    """``(LPIPS module or None, message)``."""
    if not lpips_weights:
        return None, LPIPS_HELP
    for name, path in (("--lpips-weights", lpips_weights), ("--vgg-weights", vgg_weights)):
        if path and not os.path.isfile(path):
            raise ValueError(f"eval: {name} file {path!r} does not exist")
    from vqfast.losses.lpips import LPIPS
    net = LPIPS(lpips_weights, vgg_weights)
    if not net.pretrained:
        return None, LPIPS_HELP + " (the file holds the calibration layers only)"
    return net, ""


@torch.no_grad()
def mean_lpips(net, a: torch.Tensor, b: torch.Tensor, batch_size: int = 32) -> float:
    total = 0.0
    for i in range(0, a.shape[0], batch_size):
        total += float(net(a[i:i + batch_size] * 2 - 1, b[i:i + batch_size] * 2 - 1).sum())
    return total / a.shape[0]


def evaluate(run_dir: str, *, data: str | None = None, held_out: int = 256, lpips_weights=None, vgg_weights=None,
             inception_weights=None) -> tuple[dict, list[str]]:
    """``(metrics, messages about skipped metrics)``."""
    from vqfast import data as datasets
    from vqfast.evaluation import fid_and_is, inception_or_none
    model, config = load_tokenizer(run_dir)
    spec = data or config.get("train", {}).get("data", "embedded")
    images = datasets.load(spec, int(config["crop_size"]), held_out).held_out
    metrics, rec = reconstruction_metrics(model, images)
    metrics["data"] = spec
    messages = []
    net, msg = lpips_or_none(lpips_weights, vgg_weights)
    if net is None:
        messages.append(msg)
    else:
        metrics["lpips"] = mean_lpips(net, rec, images.float())
    inception, msg = inception_or_none(inception_weights)
    if inception is None:
        messages.append("FID/IS skipped: " + msg)
    elif images.shape[0] < 2:
        messages.append("FID/IS skipped: needs at least 2 held-out images")
    else:
        metrics.update(fid_and_is(images.float(), rec, inception))
    return metrics, messages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqfast eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="run directory of `python -m vqfast train` (or train-superres)")
    p.add_argument("--data", default=None, help="data set spec (default: the one the model trained on)")
    p.add_argument("--held-out", type=int, default=256)
    p.add_argument("--lpips-weights", default=None)
    p.add_argument("--vgg-weights", default=None)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--json", default=None, help="default: RUN_DIR/eval.json")
    args = p.parse_args(argv)
    if args.held_out < 1:
        raise ValueError(f"eval: --held-out must be >= 1, got {args.held_out}")
    metrics, messages = evaluate(args.run_dir, data=args.data, held_out=args.held_out,
                                 lpips_weights=args.lpips_weights, vgg_weights=args.vgg_weights,
                                 inception_weights=args.inception_weights)
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"{args.run_dir} on {metrics['held_out_images']} held-out crops ({metrics['data']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, label, fmt in (("psnr_db", "PSNR", "{:.2f} dB"), ("ssim", "SSIM", "{:.4f}"), ("lpips", "LPIPS", "{:.4f}"),
                            ("codebook_usage_pct", "codebook usage", "{:.1f} %"), ("perplexity", "perplexity", "{:.1f}"),
                            ("bpp", "bits/pixel (fixed-length)", "{:.4f}"), ("fid", "FID", "{:.2f}"),
                            ("inception_score", "Inception Score", "{:.2f}")):
        if key in metrics:
            t.add_row(label, fmt.format(metrics[key]))
    Console().print(t)
    for m in messages:
        print(m)
    out = args.json or os.path.join(args.run_dir, "eval.json")
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
