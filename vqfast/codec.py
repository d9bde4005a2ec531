"""``python -m vqfast encode/decode``: an image to its code indices in a small file, and back.

File layout (little-endian), version 1::

    offset  size  field
    0       4     magic b"VQFC"
    4       1     version (1)
    5       1     bits per index b = ceil(log2 K) (at least 1)
    6       1     image channels C
    7       1     residual stages Q (1 for a single codebook)
    8       4     codebook size K
    12      4     image height H, then 4: width W (before padding to the grid)
    20      4     grid height h, then 4: grid width w
    28      8     model id: first 8 bytes of SHA-256 over the model config JSON and every weight
    36      4     payload length in bytes
    40      4     CRC-32 of the payload
    44      ...   payload: h * w * Q indices, row-major (stage fastest), b bits each, MSB first,
                  zero-padded to a whole byte

The indices are stored at a fixed ``ceil(log2 K)`` bits, so the code stream costs
``Q * ceil(log2 K) / downsample**2`` bits per pixel plus the 44-byte header. A file whose magic,
version, lengths, CRC or model id do not match raises ``ValueError`` saying which.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from vqfast.metrics import codebook_size_of, downsample_factor, forward_with_indices

MAGIC = b"VQFC"
VERSION = 1
HEADER = struct.Struct("<4sBBBBIIIII8sII")


def bits_for(codebook_size: int) -> int:
    return max(1, math.ceil(math.log2(codebook_size)))


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Each index as ``bits`` bits, most significant first, concatenated and zero-padded to bytes."""
    idx = np.asarray(indices, dtype=np.uint32).reshape(-1)
    if idx.size and int(idx.max()) >= (1 << bits):
        raise ValueError(f"pack_indices: an index ({int(idx.max())}) does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    return np.packbits(((idx[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)).tobytes()


def unpack_indices(payload: bytes, bits: int, count: int) -> np.ndarray:
    need = (count * bits + 7) // 8
    if len(payload) < need:
        raise ValueError(f"unpack_indices: payload holds {len(payload)} bytes, {count} indices of {bits} bits "
                         f"need {need}")
    flat = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[:count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    return flat.astype(np.int64) @ weights


def model_id(model: torch.nn.Module, config: dict) -> bytes:
    """8 bytes identifying the model: a file only decodes with the weights that wrote it."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()[:8]


def image_to_codes(model, image: torch.Tensor) -> torch.Tensor:
    """Indices ``(h, w[, Q])`` of one uint8 image ``(C, H, W)``, padded (edge replicate) to the grid."""
    f = downsample_factor(model)
    H, W = image.shape[-2:]
    x = image.float().div(255)[None] * 2 - 1
    x = F.pad(x, (0, -W % f, 0, -H % f), mode="replicate")
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        _, _, indices = forward_with_indices(model, x.to(device))
    return indices[0].cpu()


def codes_to_image(model, indices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The uint8 image ``(C, height, width)`` decoded from ``indices`` ``(h, w[, Q])``."""
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        x = model.decode_code(indices[None].to(device))
    return ((x[0, :, :height, :width].float().cpu() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def encode_bytes(model, config: dict, image: torch.Tensor) -> bytes:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        raise TypeError("encode_bytes: image must be a uint8 tensor (C, H, W)")
    k = codebook_size_of(model)
    codes = image_to_codes(model, image)
    h, w = codes.shape[:2]
    q = codes.shape[2] if codes.ndim == 3 else 1
    bits = bits_for(k)
    payload = pack_indices(codes.numpy(), bits)
    header = HEADER.pack(MAGIC, VERSION, bits, image.shape[0], q, k, image.shape[1], image.shape[2], h, w,
                         model_id(model, config), len(payload), zlib.crc32(payload))
    return header + payload


def read_header(data: bytes) -> dict:
    if len(data) < HEADER.size:
        raise ValueError(f"decode: file is truncated ({len(data)} bytes, the header alone is {HEADER.size})")
    magic, version, bits, c, q, k, H, W, h, w, mid, n, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"decode: not a vqfast code file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"decode: file version {version} is not supported (this vqfast reads {VERSION})")
    if bits != bits_for(k) or q < 1 or h < 1 or w < 1:
        raise ValueError("decode: corrupt header (bits, stages or grid size inconsistent)")
    if n != (h * w * q * bits + 7) // 8:
        raise ValueError(f"decode: corrupt header (payload length {n} does not match a {h}x{w}x{q} grid "
                         f"of {bits}-bit indices)")
    payload = data[HEADER.size:]
    if len(payload) != n:
        raise ValueError(f"decode: file is {'truncated' if len(payload) < n else 'too long'} "
                         f"(payload {len(payload)} bytes, header says {n})")
    if zlib.crc32(payload) != crc:
        raise ValueError("decode: payload is corrupt (CRC-32 mismatch)")
    return dict(bits=bits, channels=c, stages=q, codebook_size=k, height=H, width=W, grid=(h, w),
                model_id=mid, payload=payload)


def decode_bytes(model, config: dict, data: bytes) -> torch.Tensor:
    hd = read_header(data)
    if hd["model_id"] != model_id(model, config):
        raise ValueError("decode: the file was written by a different model (model id mismatch); decode it "
                         "with the checkpoint that encoded it")
    if hd["codebook_size"] != codebook_size_of(model):
        raise ValueError(f"decode: codebook size {hd['codebook_size']} does not match the model's")
    h, w = hd["grid"]
    idx = unpack_indices(hd["payload"], hd["bits"], h * w * hd["stages"])
    if idx.size and int(idx.max()) >= hd["codebook_size"]:
        raise ValueError("decode: payload holds an index outside the codebook (corrupt file)")
    codes = torch.from_numpy(idx).reshape(h, w, hd["stages"])
    if hd["stages"] == 1:
        codes = codes[..., 0]
    return codes_to_image(model, codes, hd["height"], hd["width"])


def _load_image(path: str, channels: int) -> torch.Tensor:
    from PIL import Image
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB" if channels == 3 else "L")).copy()
    t = torch.from_numpy(arr)
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t[None].contiguous()


def _save_image(path: str, image: torch.Tensor) -> None:
    from PIL import Image
    arr = image.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def _psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).div(255).pow(2).mean()
    return float(-10 * torch.log10(mse.clamp_min(1e-10)))


def encode_main(argv=None) -> int:
    from vqfast.train import load_model
    p = argparse.ArgumentParser(prog="python -m vqfast encode",
                                description="Encode an image into a vqfast code file with a trained model.")
    p.add_argument("image")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory written by `python -m vqfast train`")
    p.add_argument("-o", "--output", help="code file (default: IMAGE.vqf)")
    args = p.parse_args(argv)
    model, config = load_model(args.checkpoint)
    image = _load_image(args.image, model.config.get("in_channels", 3))
    data = encode_bytes(model, config, image)
    out = args.output or args.image + ".vqf"
    with open(out, "wb") as f:
        f.write(data)
    rec = decode_bytes(model, config, data)
    pixels = image.shape[1] * image.shape[2]
    print(f"{args.image}: {image.shape[2]}x{image.shape[1]} -> {out}: {len(data)} bytes, "
          f"{8 * len(data) / pixels:.3f} bits/pixel ({8 * (len(data) - HEADER.size) / pixels:.3f} without the "
          f"{HEADER.size}-byte header), round-trip PSNR {_psnr_uint8(rec, image):.2f} dB")
    return 0


def decode_main(argv=None) -> int:
    from vqfast.train import load_model
    p = argparse.ArgumentParser(prog="python -m vqfast decode",
                                description="Decode a vqfast code file back into an image.")
    p.add_argument("codes")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("-o", "--output", help="image file (default: CODES.png)")
    p.add_argument("--reference", help="original image: report PSNR against it")
    args = p.parse_args(argv)
    model, config = load_model(args.checkpoint)
    with open(args.codes, "rb") as f:
        data = f.read()
    image = decode_bytes(model, config, data)
    out = args.output or args.codes + ".png"
    _save_image(out, image)
    pixels = image.shape[1] * image.shape[2]
    msg = f"{args.codes}: {len(data)} bytes, {8 * len(data) / pixels:.3f} bits/pixel -> {out}"
    if args.reference:
        ref = _load_image(args.reference, image.shape[0])
        if ref.shape != image.shape:
            raise ValueError(f"decode: --reference is {tuple(ref.shape)}, the decoded image {tuple(image.shape)}")
        msg += f", PSNR {_psnr_uint8(image, ref):.2f} dB"
    print(msg)
    return 0


