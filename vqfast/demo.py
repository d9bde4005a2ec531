"""``python -m vqfast demo``: train a VQ-VAE on the embedded photographs on CPU, then fine-tune it
adversarially (VQ-GAN loss) for a few steps.

Part 1 is ``python -m vqfast train`` with the sizes below: 32 x 32 crops, a VQ-VAE with 64
channels, one residual block, downsample 4 (an 8 x 8 code grid), a residual quantizer of 4 EMA
codebooks of 512 codes of dimension 64 (4 x 9 bits per 16 pixels: 2.25 bits per pixel at fixed
length), dead-code restart, Adam at 1e-3 with a cosine decay to 1e-4. One codebook at the same rate
(downsample 2) posterized colours when tried: each code is then nearly a 2 x 2 colour patch
from a 512-entry palette. It prints the progress bar and the held-out metrics table and writes
``recon_final.png`` (held-out crops above their reconstructions) and ``usage.png``.

Part 2 loads those weights and runs taming-transformers' objective (L1 + hinge PatchGAN with the
adaptive weight, discriminator on from step 0) for a few dozen steps: the adversarial path
(generator and discriminator optimizers, ``get_last_layer``, the discriminator's hinge loss).
"""
from __future__ import annotations

import argparse
import os
import time

from vqfast import train

VQVAE_ARGS = ["--model", "vqvae", "--crop-size", "32", "--channels", "64", "--res-channels", "32",
              "--num-res-blocks", "1", "--downsample", "4", "--codebook-size", "512", "--codebook-dim", "64",
              "--quantizer", "residual", "--num-quantizers", "4",
              "--batch-size", "16", "--lr", "1e-3", "--lr-decay", "cosine", "--log-every", "50"]
GAN_ARGS = ["--model", "vqvae", "--loss", "vqgan", "--crop-size", "32", "--channels", "64", "--res-channels", "32",
            "--num-res-blocks", "1", "--downsample", "4", "--codebook-size", "512", "--codebook-dim", "64",
            "--quantizer", "residual", "--num-quantizers", "4", "--batch-size", "16", "--lr", "1e-4",
            "--disc-start", "0", "--disc-layers", "2", "--disc-ndf", "32",
            "--log-every", "10"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqfast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=1500, help="VQ-VAE training steps")
    p.add_argument("--gan-steps", type=int, default=30, help="VQ-GAN fine-tune steps")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    n_threads = args.threads
    if n_threads is None and os.getloadavg()[0] > (os.cpu_count() or 1):
        # On a machine already busier than its cores, OpenMP threads of one op wait for each other
        # at every barrier (measured here: a 3x3 conv 6x slower with 2 threads than with 1).
        n_threads = 1
        print(f"load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: using 1 thread")
    threads = ["--threads", str(n_threads)] if n_threads else []
    vqvae_out = os.path.join(args.out, "vqvae")
    gan_out = os.path.join(args.out, "vqgan_finetune")

    t0 = time.perf_counter()
    print(f"[1/2] VQ-VAE on the embedded photographs, {args.steps} steps on "
          f"{'CPU' if not _cuda() else 'GPU'} -> {vqvae_out}")
    train.main([*VQVAE_ARGS, *threads, "--steps", str(args.steps), "--image-every", str(max(args.steps // 3, 1)),
                "--checkpoint-every", str(args.steps), "--out", vqvae_out])
    t1 = time.perf_counter()
    print(f"\n[2/2] VQ-GAN fine-tune of that model (L1 + hinge PatchGAN, adaptive weight), {args.gan_steps} steps "
          f"-> {gan_out}")
    train.main([*GAN_ARGS, *threads, "--steps", str(args.gan_steps), "--init", vqvae_out,
                "--image-every", str(max(args.gan_steps, 1)), "--checkpoint-every", str(max(args.gan_steps, 1)),
                "--out", gan_out])
    t2 = time.perf_counter()
    print(f"\ndemo done in {t2 - t0:.0f} s (VQ-VAE {t1 - t0:.0f} s, VQ-GAN fine-tune {t2 - t1:.0f} s). "
          f"Reconstructions: {os.path.join(vqvae_out, 'recon_final.png')}, codebook usage: "
          f"{os.path.join(vqvae_out, 'usage.png')}, TensorBoard: tensorboard --logdir {args.out}")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
