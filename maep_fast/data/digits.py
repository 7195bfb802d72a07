"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 labelled 8x8 grayscale digits
(values 0..16) inside the scikit-learn wheel, so nothing is downloaded.

The train/test split is FIXED and stratified: for each class ``c`` (in order
0..9) the indices of that class are permuted with one
``numpy.random.default_rng(seed)`` generator, and the first ``t_c`` go to the
test split. The per-class test counts ``t_c`` add up to
``ceil(test_fraction * 1797)`` and are allotted by largest remainder of
``test_fraction * n_c`` (ties to the lower class). With the defaults
(``test_fraction=0.2``, ``seed=0``) that is 1437 train / 360 test images, with
every class in both splits. Only numpy's documented-stable ``default_rng``
(PCG64) is used, so the split is the same on every machine.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .dataset import ImageDataset, resize_images

__all__ = ["load_digits_dataset", "digits_split_indices", "DIGITS_CLASSES"]

DIGITS_CLASSES = [str(k) for k in range(10)]
_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float32 in [0, 1], labels [1797] int64)``, read-only."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.asarray(d.images, dtype=np.float32) / 16.0, 0.0, 1.0)
    labels = np.asarray(d.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=8)
def _resized(image_size: int) -> torch.Tensor:
    """All 1797 digits as ``[1797, 1, image_size, image_size]`` float32 (cached; never hand out)."""
    images, _ = _raw_digits()
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return resize_images(x, image_size)


@functools.lru_cache(maxsize=16)
def _split(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    _, labels = _raw_digits()
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    want = counts * test_fraction
    n_test = np.floor(want).astype(np.int64)
    extra = int(math.ceil(test_fraction * len(labels) - 1e-9)) - int(n_test.sum())
    order = sorted(range(len(classes)), key=lambda k: (-round(float(want[k] - n_test[k]), 9), k))
    for k in order[: max(extra, 0)]:
        n_test[k] += 1
    train, test = [], []
    for k, c in enumerate(classes):
        perm = rng.permutation(np.flatnonzero(labels == c))
        test.append(perm[: n_test[k]])
        train.append(perm[n_test[k]:])
    train_idx, test_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(f"test_fraction={test_fraction} leaves an empty split")
    train_idx.setflags(write=False)
    test_idx.setflags(write=False)
    return train_idx, test_idx


def digits_split_indices(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)``: sorted int64 indices into the 1797 digits (disjoint, covering all)."""
    test_fraction = _check_fraction(test_fraction)
    seed = _check_seed(seed)
    train_idx, test_idx = _split(test_fraction, seed)
    return train_idx.copy(), test_idx.copy()


def load_digits_dataset(
    image_size: int = 16, split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> ImageDataset:
    """The digits as an :class:`ImageDataset`.

    Returns images float32 ``[N, 1, image_size, image_size]`` in ``[0, 1]``
    (8x8 source scaled by 1/16, bilinear antialiased resize, clamped) and
    labels int64 ``[N]`` in ``0..9``. ``split``: ``"train"`` (1437 with the
    defaults), ``"test"`` (360) or ``"all"`` (1797). ``image_size >= 8``.
    Loaded arrays are cached in-process; each call returns fresh tensors.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    image_size = int(image_size)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8 originals), got {image_size}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    test_fraction = _check_fraction(test_fraction)
    seed = _check_seed(seed)

    images = _resized(image_size)
    _, labels_np = _raw_digits()
    labels = torch.from_numpy(labels_np.copy())
    if split == "all":
        return ImageDataset(images.clone(), labels, list(DIGITS_CLASSES), "digits-all")
    train_idx, test_idx = _split(test_fraction, seed)
    idx = torch.from_numpy((train_idx if split == "train" else test_idx).copy())
    return ImageDataset(images[idx], labels[idx], list(DIGITS_CLASSES), f"digits-{split}")


def _check_fraction(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)):
        raise TypeError(f"test_fraction must be a number, got {type(v).__name__}")
    v = float(v)
    if not (0.0 < v < 1.0):
        raise ValueError(f"test_fraction must be in (0, 1), got {v}")
    return v


def _check_seed(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0:
        raise ValueError(f"seed must be a non-negative int, got {v!r}")
    return int(v)
