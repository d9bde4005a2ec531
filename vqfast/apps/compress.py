"""``python -m vqfast compress IMAGE -o FILE`` / ``decompress FILE -o IMAGE``: images as prior-coded code grids.

The file is version 2 of :mod:`vqfast.codec`'s container (same magic, same first fields, read by
the same ``decompress``; version 1 files, fixed-length indices, still decode). Little-endian::

    offset  size  field
    0       4     magic b"VQFC"
    4       1     version (2)
    5       1     method (1: range coding with a CodePrior)
    6       1     image channels C
    7       1     residual stages Q
    8       4     codebook size K
    12      4     image height H, then 4: width W (before padding)
    20      4     code grid height h, then 4: width w (after padding to whole tiles)
    28      8     tokenizer id (vqfast.codec.model_id)
    36      4     payload length in bytes
    40      4     CRC-32 of the payload
    44      8     prior id (vqfast.entropy.model_hash of the prior's weights)
    52      2     tile height th, then 2: tile width tw (in codes; the prior's grid)
    56      ...   payload: constriction range-coder words (uint32, little-endian)

The prior models one ``th x tw`` tile of codes (the grid of the crops it was trained on), so the
image is padded (edge replicate) to whole tiles and every tile is one sequence. All tiles go
through the prior together, one batched step per position, and their symbols into one range-coder
stream, position-major: the decoder repeats the same batched steps, so both sides compute the
probabilities with the same arithmetic (on the same machine type; weights checked by the prior id).
"""
from __future__ import annotations

import argparse
import math
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from vqfast import codec, entropy
from vqfast.apps.codes import load_prior
from vqfast.metrics import codebook_size_of, downsample_factor

VERSION = 2
METHOD_PRIOR = 1
HEADER = struct.Struct("<4sBBBBIIIII8sII8sHH")
assert HEADER.format.startswith(codec.HEADER.format)  # version 2 extends version 1's layout


def _tiles(codes: torch.Tensor, tile) -> torch.Tensor:
    """Code grid ``(h, w, Q)`` -> ``(n_tiles, th * tw * Q)``, tiles in raster order."""
    th, tw, q = tile
    h, w = codes.shape[:2]
    return codes.reshape(h // th, th, w // tw, tw, q).permute(0, 2, 1, 3, 4).reshape(-1, th * tw * q)


def _untile(seqs: torch.Tensor, grid_hw, tile) -> torch.Tensor:
    th, tw, q = tile
    h, w = grid_hw
    return seqs.reshape(h // th, w // tw, th, tw, q).permute(0, 2, 1, 3, 4).reshape(h, w, q)


def image_tile_codes(tokenizer, image: torch.Tensor, tile) -> tuple[torch.Tensor, tuple[int, int]]:
    """Code sequences ``(n_tiles, L)`` of a uint8 image ``(C, H, W)`` padded to whole tiles, and the grid (h, w)."""
    f = downsample_factor(tokenizer)
    ph, pw = tile[0] * f, tile[1] * f
    H, W = image.shape[-2:]
    padded = F.pad(image[None].float(), (0, -W % pw, 0, -H % ph), mode="replicate")[0].round().to(torch.uint8)
    codes = codec.image_to_codes(tokenizer, padded)
    if codes.ndim == 2:
        codes = codes[..., None]
    return _tiles(codes.long(), tile), tuple(codes.shape[:2])


def compress_bytes(tokenizer, tok_config: dict, prior, tile, image: torch.Tensor) -> bytes:
    from vqfast.entropy import model_hash
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        raise TypeError("compress: image must be a uint8 tensor (C, H, W)")
    tile = tuple(int(t) for t in tile)
    if tile[0] * tile[1] * tile[2] != prior.seq_len:
        raise ValueError(f"compress: tile {tile} does not match the prior's seq_len {prior.seq_len}")
    seqs, (h, w) = image_tile_codes(tokenizer, image, tile)
    words = np.asarray(entropy.encode_codes(seqs, prior), dtype="<u4")
    payload = words.tobytes()
    header = HEADER.pack(codec.MAGIC, VERSION, METHOD_PRIOR, image.shape[0], tile[2], codebook_size_of(tokenizer),
                         image.shape[1], image.shape[2], h, w, codec.model_id(tokenizer, tok_config), len(payload),
                         zlib.crc32(payload), model_hash(prior), tile[0], tile[1])
    return header + payload


def read_header(data: bytes) -> dict:
    """Fields of a version 2 file, checked: truncation, magic, version, method, grid, length, CRC."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("decompress: data must be bytes")
    if data[:4] != codec.MAGIC[:len(data)]:
        raise ValueError(f"decompress: not a vqfast code file (magic {bytes(data[:4])!r}, expected {codec.MAGIC!r})")
    if len(data) < 5:
        raise ValueError(f"decompress: file is truncated ({len(data)} bytes)")
    if data[4] != VERSION:
        raise ValueError(f"decompress: file version {data[4]} is not a prior-coded file (version {VERSION})")
    if len(data) < HEADER.size:
        raise ValueError(f"decompress: file is truncated ({len(data)} bytes, the header alone is {HEADER.size})")
    _, _, method, c, q, k, H, W, h, w, tok_id, n, crc, prior_id, th, tw = HEADER.unpack_from(data)
    if method != METHOD_PRIOR:
        raise ValueError(f"decompress: unknown coding method {method} (this vqfast knows {METHOD_PRIOR}: prior)")
    if min(q, h, w, th, tw, k) < 1 or h % th or w % tw or n % 4:
        raise ValueError("decompress: corrupt header (grid, tile or payload length inconsistent)")
    payload = bytes(data[HEADER.size:])
    if len(payload) != n:
        raise ValueError(f"decompress: file is {'truncated' if len(payload) < n else 'too long'} "
                         f"(payload {len(payload)} bytes, header says {n})")
    if zlib.crc32(payload) != crc:
        raise ValueError("decompress: payload is corrupt (CRC-32 mismatch)")
    return dict(channels=c, stages=q, codebook_size=k, height=H, width=W, grid=(h, w), tokenizer_id=tok_id,
                prior_id=prior_id, tile=(th, tw, q), words=np.frombuffer(payload, dtype="<u4").astype(np.uint32))


def decompress_codes(tokenizer, tok_config: dict, prior, data: bytes) -> tuple[torch.Tensor, dict]:
    """The code grid ``(h, w, Q)`` of a version 2 file, and its header fields."""
    from vqfast.entropy import model_hash
    hd = read_header(data)
    if hd["prior_id"] != model_hash(prior):
        raise ValueError("decompress: the file was coded with a different prior (prior id mismatch); decompress "
                         "it with the prior run that compressed it")
    if hd["tokenizer_id"] != codec.model_id(tokenizer, tok_config):
        raise ValueError("decompress: the file was written with a different tokenizer (model id mismatch)")
    th, tw, q = hd["tile"]
    if th * tw * q != prior.seq_len or hd["codebook_size"] != prior.num_codes:
        raise ValueError("decompress: the header's tile or codebook size does not match the prior")
    h, w = hd["grid"]
    seqs = entropy.decode_codes(hd["words"], prior, n=(h // th) * (w // tw))
    return _untile(seqs, (h, w), hd["tile"]), hd


def decompress_bytes(tokenizer, tok_config: dict, prior, data: bytes) -> torch.Tensor:
    """The uint8 image ``(C, H, W)`` of a file of either version."""
    if len(data) > 4 and data[:4] == codec.MAGIC and data[4] == codec.VERSION:
        return codec.decode_bytes(tokenizer, tok_config, bytes(data))
    codes, hd = decompress_codes(tokenizer, tok_config, prior, data)
    return codec.codes_to_image(tokenizer, codes[..., 0] if hd["stages"] == 1 else codes, hd["height"], hd["width"])


def compress_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqfast compress",
                                description="Compress an image: its code grid range-coded with a trained prior.")
    p.add_argument("image")
    p.add_argument("--prior", required=True, help="run directory of `python -m vqfast train-prior`")
    p.add_argument("-o", "--output", help="default: IMAGE.vqf")
    p.add_argument("--method", choices=("prior", "raw"), default="prior",
                   help="raw: fixed-length indices (vqfast.codec version 1), for comparison")
    args = p.parse_args(argv)
    prior, config, tokenizer, tok_config = load_prior(args.prior)
    image = codec._load_image(args.image, tokenizer.config.get("in_channels", 3))
    if args.method == "prior":
        data = compress_bytes(tokenizer, tok_config, prior, config["grid"], image)
    else:
        data = codec.encode_bytes(tokenizer, tok_config, image)
    out = args.output or args.image + ".vqf"
    with open(out, "wb") as f:
        f.write(data)
    pixels = image.shape[1] * image.shape[2]
    print(f"{args.image}: {image.shape[2]}x{image.shape[1]} -> {out}: {len(data)} bytes, "
          f"{8 * len(data) / pixels:.4f} bits/pixel ({args.method}-coded indices, header included)")
    return 0


def decompress_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqfast decompress",
                                description="Decompress a vqfast code file (prior-coded or raw) into an image.")
    p.add_argument("file")
    p.add_argument("--prior", required=True, help="the train-prior run that compressed it")
    p.add_argument("-o", "--output", help="default: FILE.png")
    p.add_argument("--reference", help="original image: report PSNR against it")
    args = p.parse_args(argv)
    prior, _, tokenizer, tok_config = load_prior(args.prior)
    with open(args.file, "rb") as f:
        data = f.read()
    image = decompress_bytes(tokenizer, tok_config, prior, data)
    out = args.output or args.file + ".png"
    codec._save_image(out, image)
    msg = f"{args.file}: {len(data)} bytes, {8 * len(data) / (image.shape[1] * image.shape[2]):.4f} bits/pixel -> {out}"
    if args.reference:
        ref = codec._load_image(args.reference, image.shape[0])
        if ref.shape != image.shape:
            raise ValueError(f"decompress: --reference is {tuple(ref.shape)}, the image {tuple(image.shape)}")
        msg += f", PSNR {codec._psnr_uint8(image, ref):.2f} dB"
    print(msg)
    return 0
