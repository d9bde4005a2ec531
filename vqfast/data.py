"""Image data for training: the embedded photographs, an image folder, or CIFAR-10 / MNIST on disk.

Nothing is downloaded. The default data set (``"embedded"``) is the sample photographs that
installed packages ship inside their wheels:

* scikit-image (``skimage/data/``): astronaut, coffee, rocket, hubble_deep_field,
  motorcycle_left, retina, ihc (colour); camera, moon, brick, grass, gravel, cell, clock_motion
  (grey, repeated into three channels); held out: chelsea (colour) and coins (grey);
* scikit-learn (``sklearn/datasets/images/``): china (training), flower (held out);
* scikit-image's ``lfw_subset.npy``: 200 grey 25 x 25 faces from Labeled Faces in the Wild,
  upscaled 2x (bicubic) so a crop fits; the first 160 train, the last 40 are held out.

Synthetic pictures (chessboards, logos, text, phantoms) and motorcycle_right (a near copy of
motorcycle_left) are left out. Training batches are random crops, from images picked in
proportion to their area, at a random scale (each image
first shrunk by a factor in [1, 2]) with random horizontal flips and a random order of the RGB
channels (the photographs' colours are mostly red, brown and grey); the held-out set is a fixed grid
of crops from the held-out images, so held-out numbers measure images the model never saw.

Batches are drawn from a generator seeded by ``(seed, step, rank)``: the batch at a step does
not depend on what came before, so a resumed run sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# (package, file): training images, then held-out images.
EMBEDDED_TRAIN = [("skimage", f) for f in (
    "astronaut.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png", "retina.jpg",
    "ihc.png", "camera.png", "moon.png", "brick.png", "grass.png", "gravel.png", "cell.png", "clock_motion.png",
)] + [("sklearn", "china.jpg")]
EMBEDDED_HELD_OUT = [("skimage", "chelsea.png"), ("skimage", "coins.png"), ("sklearn", "flower.jpg")]
LFW_HELD_OUT = 40


def _package_file(package: str, name: str) -> str:
    if package == "skimage":
        import skimage
        return os.path.join(os.path.dirname(skimage.__file__), "data", name)
    import sklearn
    return os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", name)


def _load_rgb(path: str) -> torch.Tensor:
    """uint8 (3, H, W); grey images repeated into three channels, alpha dropped."""
    from PIL import Image
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _lfw_faces() -> list[torch.Tensor]:
    from PIL import Image
    faces = np.load(_package_file("skimage", "lfw_subset.npy"))          # (200, 25, 25) float in [0, 1]
    out = []
    for f in faces:
        im = Image.fromarray((f * 255).round().astype(np.uint8)).resize((50, 50), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy())[None].expand(3, -1, -1).contiguous())
    return out


@dataclass
class ImageSet:
    """Training images (uint8 (C, H, W) each, sizes may differ) and the held-out crops (N, C, S, S) in [0, 1]."""

    name: str
    train: list
    held_out: torch.Tensor
    channels: int
    crop_size: int
    min_scale: float = 1.0
    max_scale: float = 2.0
    held_out_photo: torch.Tensor | None = None   # one whole held-out image, uint8 (C, H, W), for a picture
    # Shuffle the RGB channels of each training crop: the embedded photographs are mostly red, brown
    # and grey (retina, skin, ihc, hubble), and without it a model turns green eyes brown.
    permute_colors: bool = False

    def batch(self, batch_size: int, seed: int, step: int, rank: int = 0) -> torch.Tensor:
        """Random crops ``(batch_size, C, S, S)`` in [0, 1], a pure function of (seed, step, rank)."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
        s = self.crop_size
        out = torch.empty(batch_size, self.channels, s, s)
        # Images are picked in proportion to their area, so the 160 small faces (2,500 pixels each)
        # weigh as much as one photograph, not 160 of them (uniform picks made 91% of crops grey faces).
        areas = torch.tensor([float(im.shape[-2] * im.shape[-1]) for im in self.train])
        picks = torch.multinomial(areas, batch_size, replacement=True, generator=g)
        scales = torch.empty(batch_size).uniform_(self.min_scale, self.max_scale, generator=g)
        flips = torch.rand(batch_size, generator=g) < 0.5
        offsets = torch.rand(batch_size, 2, generator=g)
        perms = [torch.randperm(self.channels, generator=g) for _ in range(batch_size)] if self.permute_colors else None
        for i in range(batch_size):
            img = self.train[int(picks[i])]
            h, w = img.shape[-2:]
            # Crop a (s * scale)-sized window, then shrink it to s: a crop of the image shrunk by `scale`,
            # without resizing the whole photograph each time. Capped so the window fits the image.
            win = int(min(s * float(scales[i]), h, w))
            top = int(float(offsets[i, 0]) * (h - win + 1)) if h > win else 0
            left = int(float(offsets[i, 1]) * (w - win + 1)) if w > win else 0
            crop = img[:, top:top + win, left:left + win].float().div_(255)
            if win != s:
                crop = F.interpolate(crop[None], size=(s, s), mode="bilinear", antialias=True,
                                     align_corners=False)[0]
            if perms is not None:
                crop = crop[perms[i]]
            out[i] = crop.flip(-1) if flips[i] else crop
        return out.clamp_(0, 1)


def _grid_crops(images: list, s: int, limit: int) -> torch.Tensor:
    """Non-overlapping s x s crops, row by row, from each image in turn, at most ``limit``."""
    per_image = []
    for img in images:
        h, w = img.shape[-2:]
        per_image.append([img[:, t:t + s, l:l + s] for t in range(0, h - s + 1, s) for l in range(0, w - s + 1, s)])
    crops = []
    # Round-robin over images so a small limit still covers every held-out image.
    for i in range(max((len(p) for p in per_image), default=0)):
        crops += [p[i] for p in per_image if i < len(p)]
    crops = crops[:limit]
    if not crops:
        raise ValueError(f"no held-out image is at least {s} x {s} pixels")
    return torch.stack(crops).float().div_(255)


def embedded(crop_size: int = 32, held_out_limit: int = 256) -> ImageSet:
    """The default data set: photographs shipped inside scikit-image and scikit-learn (see module doc)."""
    train = [_load_rgb(_package_file(p, f)) for p, f in EMBEDDED_TRAIN]
    held = [_load_rgb(_package_file(p, f)) for p, f in EMBEDDED_HELD_OUT]
    faces = _lfw_faces() if crop_size <= 50 else []
    train += faces[:len(faces) - LFW_HELD_OUT]
    held_crops = _grid_crops(held, crop_size, held_out_limit)
    if faces:
        n_faces = min(LFW_HELD_OUT, max(held_out_limit // 8, 1))
        face_crops = torch.stack([f[:, :crop_size, :crop_size] for f in faces[-n_faces:]]).float().div_(255)
        keep = max(held_out_limit - n_faces, 0)
        held_crops = torch.cat([held_crops[:keep], face_crops])
    return ImageSet("embedded", train, held_crops, 3, crop_size, held_out_photo=held[0], permute_colors=True)


def image_folder(root: str, crop_size: int = 32, held_out_fraction: float = 0.1,
                 held_out_limit: int = 256) -> ImageSet:
    """Every image under ``root`` (recursively); the last ``held_out_fraction`` of the sorted paths is held out."""
    if not os.path.isdir(root):
        raise ValueError(f"data: image folder {root!r} does not exist")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if len(paths) < 2:
        raise ValueError(f"data: image folder {root!r} needs at least 2 images ({IMAGE_SUFFIXES}), found {len(paths)}")
    n_held = max(1, int(round(len(paths) * held_out_fraction)))
    images = [_load_rgb(p) for p in paths]
    small = [p for p, im in zip(paths, images) if min(im.shape[-2:]) < crop_size]
    if small:
        raise ValueError(f"data: {len(small)} images are smaller than crop_size={crop_size}, e.g. {small[0]!r}")
    return ImageSet(f"folder:{root}", images[:-n_held], _grid_crops(images[-n_held:], crop_size, held_out_limit),
                    3, crop_size, held_out_photo=images[-n_held])


def torchvision_set(name: str, root: str, held_out_limit: int = 256) -> ImageSet:
    """CIFAR-10 or MNIST from torchvision's files under ``root`` (never downloaded); the test split is held out.

    The images are used whole (crop_size = their size, 32 or 28, no rescaling)."""
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST}[name]
    try:
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as e:
        raise ValueError(f"data: {name} not found under {root!r} (vqfast never downloads; put torchvision's "
                         f"{name} files there): {e}") from None

    def as_uint8(ds) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(ds.data))
        return x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x[:, None].contiguous()

    tr, te = as_uint8(train), as_uint8(test)
    s = tr.shape[-1]
    return ImageSet(name, list(tr), te[:held_out_limit].float().div(255), tr.shape[1], s, 1.0, 1.0)


def digits(crop_size: int = 32, held_out_limit: int = 256) -> ImageSet:
    """The embedded stand-in for MNIST: scikit-learn's 1797 handwritten digits (8 x 8, 17 grey levels,
    shipped in its wheel) upsampled (bicubic) to ``crop_size``, one channel; the last 20% are held out.
    Used whole (no random crops or rescaling), as MNIST is."""
    from sklearn.datasets import load_digits
    x = torch.from_numpy(load_digits().images).float().div(16)[:, None]             # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(crop_size, crop_size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    n_held = x.shape[0] // 5
    return ImageSet("digits", list(x[:-n_held]), x[-n_held:][:held_out_limit].float().div(255), 1, crop_size,
                    1.0, 1.0)


def load(spec: str = "embedded", crop_size: int = 32, held_out_limit: int = 256) -> ImageSet:
    """``"embedded"``, ``"digits"`` (the embedded MNIST stand-in), a folder path, or ``"cifar10:ROOT"`` /
    ``"mnist:ROOT"``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data: spec must be 'embedded', a folder, or 'cifar10:ROOT' / 'mnist:ROOT', got {spec!r}")
    if not isinstance(crop_size, int) or crop_size < 4:
        raise ValueError(f"data: crop_size must be an int >= 4, got {crop_size!r}")
    if spec == "embedded":
        return embedded(crop_size, held_out_limit)
    if spec == "digits":
        return digits(crop_size, held_out_limit)
    if spec == "mnist":
        raise ValueError("data: pass mnist:ROOT (torchvision's MNIST files under ROOT, never downloaded), or "
                         "'digits' for the embedded stand-in (scikit-learn's digits, upsampled)")
    kind, _, root = spec.partition(":")
    if kind in ("cifar10", "mnist") and root:
        return torchvision_set(kind, root, held_out_limit)
    return image_folder(spec, crop_size, held_out_limit=held_out_limit)
