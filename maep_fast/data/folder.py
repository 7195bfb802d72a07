"""Image files on disk: class folders, loose files, and writing PNGs.

* :func:`load_image_folder` reads ``root/<class_name>/<image files>``
  (torchvision ``ImageFolder`` layout); label ``k`` is the ``k``-th class
  directory name in sorted order.
* :func:`load_images` reads a list of image files into one ``[N, C, H, W]``
  tensor (used by the ``purify`` command line).
* :func:`save_images` writes ``[N, C, H, W]`` tensors in ``[0, 1]`` as 8-bit PNGs.

Readable suffixes: ``.png .jpg .jpeg .bmp .webp`` (case-insensitive), via PIL.
Hidden files and directories (leading ``.``) are skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .._checks import check_images
from .dataset import ImageDataset, resize_images

__all__ = ["load_image_folder", "load_images", "save_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _check_channels(channels: object) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return int(channels)  # type: ignore[arg-type]


def _check_size(image_size: object) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    return image_size


def _read_one(path: Path, channels: int) -> torch.Tensor:
    """One image file -> float32 ``[C, H, W]`` in ``[0, 1]``."""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 255.0)


def _stack(tensors: list[torch.Tensor], paths: Sequence[Path], image_size: int | None) -> torch.Tensor:
    if image_size is not None:
        return torch.cat([resize_images(t.unsqueeze(0), image_size) for t in tensors])
    sizes = {tuple(t.shape[1:]) for t in tensors}
    if len(sizes) > 1:
        first = tuple(tensors[0].shape[1:])
        odd = next(p for p, t in zip(paths, tensors) if tuple(t.shape[1:]) != first)
        raise ValueError(
            f"images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(sizes))}), e.g. "
            f"{paths[0]} is {first[0]}x{first[1]} but {odd} is not; pass image_size= to resize them all"
        )
    return torch.stack(tensors)


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def load_images(
    paths: Sequence[str | Path], channels: int = 3, image_size: int | None = None
) -> torch.Tensor:
    """Read image files into float32 ``[N, channels, H, W]`` in ``[0, 1]``.

    All images must share one size unless ``image_size`` is given, in which
    case each is resized (bilinear, antialiased) to ``image_size x image_size``.
    """
    channels = _check_channels(channels)
    image_size = _check_size(image_size)
    if isinstance(paths, (str, Path)):
        raise TypeError("paths must be a list of image paths, not a single path")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("load_images() got an empty list of paths")
    return _stack([_read_one(p, channels) for p in paths], paths, image_size)


def load_image_folder(
    root: str | Path, image_size: int | None = None, channels: int = 3
) -> ImageDataset:
    """Read ``root/<class_name>/<image files>`` into an :class:`ImageDataset`.

    Returns images float32 ``[N, channels, H, W]`` in ``[0, 1]`` (``H = W =
    image_size`` when given; otherwise all images must share one size) and
    labels int64 ``[N]``; ``classes`` = sorted class directory names. Files
    are ordered by class, then by file name.
    """
    channels = _check_channels(channels)
    image_size = _check_size(image_size)
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist (expected layout {root}/<class_name>/<images>)")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory (expected layout {root}/<class_name>/<images>)")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        raise ValueError(
            f"{root} has no class sub-directories; expected layout {root}/<class_name>/<image files> "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    files: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    for k, d in enumerate(class_dirs):
        found = sorted((p for p in d.iterdir() if _is_image(p)), key=lambda p: p.name)
        if not found:
            empty.append(d.name)
        files += found
        labels += [k] * len(found)
    if empty:
        raise ValueError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images with suffix {', '.join(IMAGE_SUFFIXES)}"
        )
    images = _stack([_read_one(p, channels) for p in files], files, image_size)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs], root.name or str(root))


def save_images(images: torch.Tensor, paths: Sequence[str | Path]) -> list[Path]:
    """Write ``images`` float ``[N, C, H, W]`` in ``[0, 1]`` (C = 1 or 3) as 8-bit PNGs.

    ``paths[i]`` receives image ``i`` and must end in ``.png``; parent
    directories are created. Pixels are rounded to ``round(255 * x)``, so a
    reload matches to within 1/510. Grayscale (mode ``L``) for ``C = 1``.
    Returns the written paths.
    """
    images = check_images(images, "images")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
    if isinstance(paths, (str, Path)):
        raise TypeError("paths must be a list with one path per image, not a single path")
    paths = [Path(p) for p in paths]
    if len(paths) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(paths)} paths")
    bad = [str(p) for p in paths if p.suffix.lower() != ".png"]
    if bad:
        raise ValueError(f"save_images writes PNG files; these paths do not end in .png: {', '.join(bad[:3])}")
    arr = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    for a, p in zip(arr, paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.ascontiguousarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)))
        img.save(p, format="PNG")
    return paths
