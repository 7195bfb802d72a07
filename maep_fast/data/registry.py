"""``load_dataset``: data sets by name, and the name -> loader table.

This module sits above the loaders (``digits``, ``cifar``, ``folder``), which
sit above the base class in :mod:`maep_fast.data.dataset`, so the imports run
one way: dataset <- loaders <- registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .cifar import load_cifar
from .dataset import ImageDataset, resize_images
from .digits import load_digits_dataset
from .folder import load_image_folder

__all__ = ["DATASET_NAMES", "LOADERS", "load_dataset"]


def _digits(name: str, root, split: str, image_size: int | None, split_seed: int | None = None) -> ImageDataset:
    return load_digits_dataset(image_size=16 if image_size is None else image_size, split=split,
                               seed=0 if split_seed is None else split_seed)


def _cifar(name: str, root, split: str, image_size: int | None) -> ImageDataset:
    if root is None:
        raise ValueError(f"{name} needs root= pointing at the official CIFAR python files; maep_fast never downloads")
    ds = load_cifar(root, name.strip().lower().replace("-", ""), split)
    if image_size is not None and image_size != ds.images.shape[-1]:
        ds = ImageDataset(resize_images(ds.images, image_size), ds.labels, ds.classes, ds.name)
    return ds


def _folder(name: str, root, split: str, image_size: int | None) -> ImageDataset:
    if root is None:
        raise ValueError("the 'folder' data set needs root= (layout root/<class_name>/<image files>)")
    root = Path(root)
    if isinstance(split, str) and split and (root / split).is_dir():
        root = root / split
    return load_image_folder(root, image_size=image_size)


# name (lower case, no dashes) -> loader(name as given, root, split, image_size)
LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "folder": _folder,
}
DATASET_NAMES = tuple(LOADERS)


def load_dataset(
    name: str = "digits",
    root: str | Path | None = None,
    split: str = "train",
    image_size: int | None = None,
    split_seed: int | None = None,
) -> ImageDataset:
    """Load a data set by name: ``"digits"``, ``"cifar10"``, ``"cifar100"`` or ``"folder"``.

    * ``digits``: embedded (no files); ``root`` is ignored, ``image_size``
      defaults to 16, ``split`` in ``train|test|all``; ``split_seed`` (default
      0) picks one of its fixed stratified train/test partitions, so a model
      can be trained and scored on a split other than the demo's.
    * ``cifar10`` / ``cifar100``: official python files under ``root``;
      ``split`` in ``train|test``; images are resized if ``image_size`` is
      given and differs from 32.
    * ``folder``: ``root/<class>/<image>``; if ``root/<split>`` is a directory
      it is used instead (``root/train/<class>/...`` layouts), RGB images.

    ``split_seed`` applies to ``digits`` only; the other data sets ship
    their own splits, so passing it for them is an error.

    maep_fast never downloads anything.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    loader = LOADERS.get(name.strip().lower().replace("-", ""))
    if loader is None:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if split_seed is None:
        return loader(name, root, split, image_size)
    if loader is not _digits:
        raise ValueError(f"split_seed (--split-seed) applies to the embedded digits only; {name!r} has fixed splits")
    return loader(name, root, split, image_size, split_seed=split_seed)
