"""``python -m vqfast rate-distortion --prior RUN_DIR``: the tokenizer as an image codec, beside JPEG and WebP.

On held-out images (by default the embedded data set's held-out photographs, whole), four ways
to store each image, every size a whole file with its header:

* raw indices: :mod:`vqfast.codec` version 1, ``ceil(log2 K)`` bits per code;
* prior-coded indices: :mod:`vqfast.apps.compress`, the same codes range-coded with the prior
  (same picture as raw, fewer bits; the round trip is checked bit for bit on every image);
* JPEG and WebP from Pillow at matched bits per pixel: the highest quality whose file is no larger
  than the prior-coded file of the same image (binary search over the quality).

Prints the table (bits per pixel, PSNR, SSIM, averaged over images) and writes a PNG of PSNR
against bits per pixel with JPEG's and WebP's whole quality curves.
"""
from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
import torch

from vqfast import codec
from vqfast.apps.codes import load_prior
from vqfast.apps.compress import _tiles, compress_bytes, decompress_codes, image_tile_codes
from vqfast.metrics import psnr, ssim

PILLOW_FORMATS = {"JPEG": (1, 95), "WEBP": (0, 100)}


def held_out_images(spec: str = "embedded", max_side: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """``(name, uint8 (3, H, W))`` of the held-out photographs, optionally centre-cropped to ``max_side``."""
    from vqfast import data
    if spec != "embedded":
        raise NotImplementedError(f"rate-distortion: --images {spec!r}; pass 'embedded' or a list of image files")
    out = []
    for pkg, name in data.EMBEDDED_HELD_OUT:
        img = data._load_rgb(data._package_file(pkg, name))
        if max_side:
            h, w = img.shape[-2:]
            t, l = max(0, (h - max_side) // 2), max(0, (w - max_side) // 2)
            img = img[:, t:t + max_side, l:l + max_side].contiguous()
        out.append((name, img))
    return out


def pillow_round_trip(image: torch.Tensor, fmt: str, quality: int) -> tuple[int, torch.Tensor]:
    """``(file size in bytes, decoded uint8 image)`` of ``image`` saved by Pillow as ``fmt`` at ``quality``."""
    from PIL import Image
    buf = io.BytesIO()
    arr = image.permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(buf, fmt, quality=quality, **({"optimize": True} if fmt == "JPEG" else {"method": 6}))
    size = buf.tell()
    buf.seek(0)
    with Image.open(buf) as im:
        dec = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    return size, dec


def matched_quality(image: torch.Tensor, fmt: str, max_bytes: int) -> tuple[int, int, torch.Tensor]:
    """The highest quality whose file fits ``max_bytes`` (binary search; file size grows with quality),
    or the lowest quality if none fits. Returns ``(quality, bytes, decoded image)``."""
    lo, hi = PILLOW_FORMATS[fmt]
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        size, dec = pillow_round_trip(image, fmt, mid)
        if size <= max_bytes:
            best, lo = (mid, size, dec), mid + 1
        else:
            hi = mid - 1
    if best is None:
        q = PILLOW_FORMATS[fmt][0]
        size, dec = pillow_round_trip(image, fmt, q)
        best = (q, size, dec)
    return best


def _quality(rec: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    a, b = rec[None].float() / 255, ref[None].float() / 255
    return psnr(a, b), ssim(a, b)


def rate_distortion(tokenizer, tok_config, prior, tile, images, curve_qualities=(5, 10, 20, 30, 50, 70, 85, 95)):
    """Rows ``{method: {bpp, psnr_db, ssim, per_image}}`` and the JPEG/WebP curves ``{fmt: [(bpp, psnr)]}``."""
    rows = {m: [] for m in ("raw indices", "prior-coded indices", "JPEG (matched bpp)", "WebP (matched bpp)")}
    curves = {"JPEG": [], "WEBP": []}
    channels = tokenizer.config.get("in_channels", 3)
    for name, img in images:
        if img.shape[0] != channels or img.shape[0] != 3:
            raise ValueError(f"rate-distortion: image {name!r} has {img.shape[0]} channels; the comparison with "
                             f"JPEG/WebP needs RGB images and an RGB tokenizer (it takes {channels})")
        pixels = img.shape[1] * img.shape[2]
        raw = codec.encode_bytes(tokenizer, tok_config, img)
        rec = codec.decode_bytes(tokenizer, tok_config, raw)
        coded = compress_bytes(tokenizer, tok_config, prior, tile, img)
        codes, hd = decompress_codes(tokenizer, tok_config, prior, coded)
        if not torch.equal(_tiles(codes, hd["tile"]), image_tile_codes(tokenizer, img, hd["tile"])[0]):
            raise RuntimeError(f"rate-distortion: {name}: the decompressed codes differ from the encoded ones")
        rec2 = codec.codes_to_image(tokenizer, codes[..., 0] if hd["stages"] == 1 else codes, hd["height"],
                                    hd["width"])
        p, s = _quality(rec, img)
        p2, s2 = _quality(rec2, img)
        rows["raw indices"].append((name, 8 * len(raw) / pixels, p, s, None))
        rows["prior-coded indices"].append((name, 8 * len(coded) / pixels, p2, s2, None))
        for fmt, label in (("JPEG", "JPEG (matched bpp)"), ("WEBP", "WebP (matched bpp)")):
            q, size, dec = matched_quality(img, fmt, len(coded))
            rows[label].append((name, 8 * size / pixels, *_quality(dec, img), q))
            for cq in curve_qualities:
                size, dec = pillow_round_trip(img, fmt, cq)
                curves[fmt].append((cq, 8 * size / pixels, _quality(dec, img)[0]))
    table = {}
    for method, r in rows.items():
        table[method] = {"bpp": float(np.mean([x[1] for x in r])), "psnr_db": float(np.mean([x[2] for x in r])),
                         "ssim": float(np.mean([x[3] for x in r])),
                         "per_image": [dict(image=x[0], bpp=x[1], psnr_db=x[2], ssim=x[3], quality=x[4]) for x in r]}
    mean_curves = {}
    for fmt, pts in curves.items():  # average over images at each quality
        mean_curves[fmt] = [(float(np.mean([b for q, b, _ in pts if q == cq])),
                             float(np.mean([p for q, _, p in pts if q == cq]))) for cq in curve_qualities]
    return table, mean_curves


def print_rd_table(table: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=title)
    for col in ("method", "bits/pixel", "PSNR (dB)", "SSIM"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for method, r in table.items():
        qual = [x["quality"] for x in r["per_image"] if x["quality"] is not None]
        label = method + (f" q={'/'.join(map(str, qual))}" if qual else "")
        t.add_row(label, f"{r['bpp']:.4f}", f"{r['psnr_db']:.2f}", f"{r['ssim']:.4f}")
    Console().print(t)


def plot_psnr_bpp(path: str, table: dict, curves: dict) -> None:
    """PSNR against bits per pixel, drawn with Pillow (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw
    W, H, L, B, T, R = 640, 420, 60, 45, 30, 20
    pts = [p for c in curves.values() for p in c] + [(r["bpp"], r["psnr_db"]) for r in table.values()]
    x_max = max(b for b, _ in pts) * 1.05
    y_lo, y_hi = min(p for _, p in pts) - 1, max(p for _, p in pts) + 1
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)

    def xy(b, p):
        return L + (W - L - R) * b / x_max, H - B - (H - B - T) * (p - y_lo) / (y_hi - y_lo)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(6):
        b, p = x_max * i / 5, y_lo + (y_hi - y_lo) * i / 5
        x, _ = xy(b, y_lo)
        _, y = xy(0, p)
        d.text((x - 10, H - B + 5), f"{b:.2f}", fill="black")
        d.text((5, y - 6), f"{p:.1f}", fill="black")
    d.text((W // 2 - 40, H - 18), "bits per pixel", fill="black")
    d.text((L, 8), "PSNR (dB) vs bits per pixel, held-out images", fill="black")
    colors = {"JPEG": (200, 60, 60), "WEBP": (40, 140, 60)}
    for fmt, c in curves.items():
        line = [xy(b, p) for b, p in sorted(c)]
        d.line(line, fill=colors[fmt], width=2)
        d.text((line[-1][0] - 40, line[-1][1] - 14), fmt, fill=colors[fmt])
    for (method, r), col in zip(table.items(), [(40, 80, 200), (120, 40, 160), (200, 60, 60), (40, 140, 60)]):
        x, y = xy(r["bpp"], r["psnr_db"])
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
        if "indices" in method:   # one label above its point, the other below: the points share a height
            d.text((x + 6, y - 16 if method.startswith("prior") else y + 4), method, fill=col)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqfast rate-distortion", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prior", required=True, help="run directory of `python -m vqfast train-prior`")
    p.add_argument("--images", nargs="*", default=None, help="image files (default: the embedded held-out photos)")
    p.add_argument("--max-side", type=int, default=None, help="centre-crop images to at most this size")
    p.add_argument("--out", default=None, help="directory for rd.json and rd.png (default: PRIOR)")
    args = p.parse_args(argv)
    prior, config, tokenizer, tok_config = load_prior(args.prior)
    if args.images:
        images = [(os.path.basename(f), codec._load_image(f, 3)) for f in args.images]
    else:
        images = held_out_images("embedded", args.max_side)
    table, curves = rate_distortion(tokenizer, tok_config, prior, config["grid"], images)
    out = args.out or args.prior
    os.makedirs(out, exist_ok=True)
    print_rd_table(table, f"rate-distortion on {len(images)} held-out images (whole files, headers included)")
    with open(os.path.join(out, "rd.json"), "w") as f:
        json.dump({"table": table, "curves": curves}, f, indent=2)
    plot_psnr_bpp(os.path.join(out, "rd.png"), table, curves)
    print(f"wrote {out}/rd.json, rd.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
