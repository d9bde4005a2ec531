"""``python -m vqfast demo-apps``: issue 7's applications on the embedded photographs, on CPU.

1. a VQ-VAE tokenizer (``python -m vqfast train``: 32 x 32 crops, downsample 4, one EMA codebook
   of 256 codes: an 8 x 8 grid, 64 codes per crop, 0.5 bits/pixel at fixed length);
2. a CodePrior on its codes (``train-prior``): held-out bits/code beside log2 K and the unigram
   entropy, samples/s with and without the KV cache; ``sample`` writes a 16-image grid;
3. compression (``compress`` / ``decompress``): one held-out photograph round-trips and its codes
   are checked bit for bit; ``rate-distortion`` prints raw and prior-coded indices beside JPEG and
   WebP at matched bits per pixel and writes the PSNR-against-bpp plot;
4. restoration: denoising through the tokenizer, and 2x / 4x super-resolution tokenizers
   (``train-superres``), PSNR/SSIM of input and output against the clean held-out crops;
5. ``eval`` of the tokenizer (FID/IS and LPIPS only with local weight files).

The step counts are knobs; the defaults fit about ten minutes on two quiet cores.
"""
from __future__ import annotations

import argparse
import json
import os
import time

TOKENIZER_ARGS = ["--model", "vqvae", "--crop-size", "32", "--channels", "64", "--res-channels", "32",
                  "--num-res-blocks", "1", "--downsample", "4", "--codebook-size", "256", "--codebook-dim", "32",
                  "--quantizer", "ema", "--batch-size", "16", "--lr", "1e-3", "--lr-decay", "cosine",
                  "--held-out", "256", "--no-tensorboard"]
PRIOR_ARGS = ["--num-crops", "4096", "--dim", "128", "--depth", "2", "--heads", "4", "--batch-size", "64",
              "--lr", "1e-3", "--dropout", "0.1"]
# Tiny sizes for the tests: seconds, not quality.
QUICK_TOKENIZER_ARGS = ["--model", "vqvae", "--crop-size", "16", "--channels", "16", "--res-channels", "8",
                        "--num-res-blocks", "1", "--downsample", "4", "--codebook-size", "32", "--codebook-dim", "8",
                        "--batch-size", "8", "--lr", "2e-3", "--held-out", "16", "--no-tensorboard"]
QUICK_PRIOR_ARGS = ["--num-crops", "128", "--held-out", "16", "--dim", "32", "--depth", "1", "--heads", "2",
                    "--batch-size", "16", "--bench-samples", "2"]


def _threads(requested):
    if requested is not None:
        return requested
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # A machine busier than its cores: OpenMP threads of one op wait for each other at every barrier.
        print(f"load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: using 1 thread")
        return 1
    return None


def main(argv=None) -> int:
    from vqfast import codec
    from vqfast.apps import compress, rate_distortion, restore, sample, train_prior
    from vqfast.apps.codes import load_prior
    from vqfast.apps.evaluate import main as eval_main
    from vqfast.train import main as train_main

    p = argparse.ArgumentParser(prog="python -m vqfast demo-apps", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/apps")
    p.add_argument("--tokenizer-steps", type=int, default=1200)
    p.add_argument("--prior-steps", type=int, default=600)
    p.add_argument("--superres-steps", type=int, default=500, help="per scale")
    p.add_argument("--tokenizer", default=None, help="use this trained tokenizer run instead of training one")
    p.add_argument("--rd-max-side", type=int, default=None, help="centre-crop the rate-distortion images")
    p.add_argument("--sigma", type=float, default=0.1, help="noise of the denoising measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny models and crops (for tests): seconds, not quality")
    args = p.parse_args(argv)
    n_threads = _threads(args.threads)
    threads = ["--threads", str(n_threads)] if n_threads else []
    if n_threads:
        import torch
        torch.set_num_threads(n_threads)
    tok_args, prior_args = (QUICK_TOKENIZER_ARGS, QUICK_PRIOR_ARGS) if args.quick else (TOKENIZER_ARGS, PRIOR_ARGS)
    progress = ["--no-progress"] if args.quick else []
    os.makedirs(args.out, exist_ok=True)
    tok_dir = args.tokenizer or os.path.join(args.out, "tokenizer")
    prior_dir = os.path.join(args.out, "prior")
    summary, times = {}, {}
    t = time.perf_counter()

    if args.tokenizer is None:
        print(f"[1/5] tokenizer: VQ-VAE, {args.tokenizer_steps} steps -> {tok_dir}", flush=True)
        train_main([*tok_args, *threads, *progress, "--steps", str(args.tokenizer_steps), "--out", tok_dir,
                    "--image-every", str(10**9), "--checkpoint-every", str(max(args.tokenizer_steps, 1)),
                    "--log-every", "100"])
    times["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"\n[2/5] prior on its codes, {args.prior_steps} steps -> {prior_dir}", flush=True)
    train_prior.main(["--tokenizer", tok_dir, "--out", prior_dir, *prior_args, *threads, *progress,
                      "--steps", str(args.prior_steps), "--log-every", "100"])
    with open(os.path.join(prior_dir, "metrics.json")) as f:
        summary["prior"] = json.load(f)
    sample.main(["--prior", prior_dir, "--n", "16", "-o", os.path.join(args.out, "samples.png")])
    times["prior"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n[3/5] compression", flush=True)
    prior, config, tokenizer, tok_config = load_prior(prior_dir)
    name, photo = rate_distortion.held_out_images("embedded", args.rd_max_side or (64 if args.quick else None))[0]
    data = compress.compress_bytes(tokenizer, tok_config, prior, config["grid"], photo)
    with open(os.path.join(args.out, "photo.vqf"), "wb") as f:
        f.write(data)
    codes, hd = compress.decompress_codes(tokenizer, tok_config, prior, data)
    exact = torch_equal(compress._tiles(codes, hd["tile"]),
                        compress.image_tile_codes(tokenizer, photo, hd["tile"])[0])
    image = compress.decompress_bytes(tokenizer, tok_config, prior, data)
    codec._save_image(os.path.join(args.out, "photo_decompressed.png"), image)
    print(f"{name} {photo.shape[2]}x{photo.shape[1]}: {len(data)} bytes "
          f"({8 * len(data) / (photo.shape[1] * photo.shape[2]):.4f} bits/pixel); decompressed codes identical to "
          f"the encoded ones: {exact}")
    if not exact:
        raise RuntimeError("demo-apps: the compressed codes did not round-trip")
    images = rate_distortion.held_out_images("embedded", args.rd_max_side or (64 if args.quick else None))
    table, curves = rate_distortion.rate_distortion(tokenizer, tok_config, prior, config["grid"], images)
    rate_distortion.print_rd_table(table, f"rate-distortion on {len(images)} held-out photographs "
                                          f"(whole files, headers included)")
    rate_distortion.plot_psnr_bpp(os.path.join(args.out, "rd.png"), table, curves)
    summary["rate_distortion"] = table
    summary["rate_distortion_curves"] = curves
    times["compression"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n[4/5] restoration", flush=True)
    from vqfast.apps.codes import held_out_crops
    rows = {}
    crop = int(tok_config["crop_size"])
    clean = held_out_crops("embedded", crop, 256)
    row, noisy, restored = restore.restoration_table(tokenizer, clean, "denoise", sigma=args.sigma)
    rows[f"denoise sigma={args.sigma}"] = row
    restore.save_side_by_side(os.path.join(args.out, "denoise.png"), clean, noisy, restored)
    sr_args = [a for a in tok_args if a not in ("--lr-decay", "cosine")]
    for scale in (2, 4):
        sr_dir = os.path.join(args.out, f"superres_x{scale}")
        sr = restore.train_superres(restore.build_superres_parser().parse_args(
            [*sr_args, *threads, "--no-progress", "--scale", str(scale), "--steps", str(args.superres_steps),
             "--out", sr_dir, "--checkpoint-every", str(max(args.superres_steps, 1)), "--log-every", "100"]))
        rows[f"superres x{scale}"] = sr[f"superres_x{scale}"]
    restore.print_restore_table(rows, f"restoration on {clean.shape[0]} held-out crops, PSNR/SSIM against the clean "
                                      f"image")
    summary["restoration"] = rows
    times["restoration"] = time.perf_counter() - t

    t = time.perf_counter()
    print("\n[5/5] eval", flush=True)
    eval_main([tok_dir])
    times["eval"] = time.perf_counter() - t
    summary["seconds"] = times
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {args.out}/: samples.png, rd.png, denoise.png, superres_x2/superres.png, superres_x4/superres.png, "
          f"summary.json; times " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return 0


def torch_equal(a, b) -> bool:
    import torch
    return bool(torch.equal(a, b))


if __name__ == "__main__":
    raise SystemExit(main())
