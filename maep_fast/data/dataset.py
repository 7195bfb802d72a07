"""``ImageDataset``: an in-memory labelled image batch, the base every loader returns.

Every loader in :mod:`maep_fast.data` returns an :class:`ImageDataset` holding

* ``images``: float32 tensor ``[N, C, H, W]`` with pixel values in ``[0, 1]``
* ``labels``: int64 tensor ``[N]`` with values in ``[0, len(classes))``
* ``classes``: class names, ``classes[k]`` names label ``k``
* ``name``: a short human-readable name (``"digits-train"``, ...)

This module imports no loader: ``load_dataset`` and the name -> loader table
live in :mod:`maep_fast.data.registry`, above the loaders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import sys
import warnings
from typing import Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .._checks import check_images, check_tensor

__all__ = ["ImageDataset", "resize_images"]


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize ``images [N, C, H, W]`` to ``[N, C, image_size, image_size]``.

    Bilinear with antialiasing (``align_corners=False``), clamped to ``[0, 1]``;
    a no-op copy when the size already matches.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if tuple(images.shape[-2:]) == (image_size, image_size):
        return images.clone()
    out = torch.nn.functional.interpolate(
        images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    )
    return out.clamp_(0.0, 1.0)


@dataclass(eq=False, repr=False)
class ImageDataset(Dataset):
    """Labelled images held in memory.

    ``dataset[i]`` returns ``(image [C, H, W], label [])``; ``dataset[indices]``
    (a list / 1-D tensor of indices) returns the batch ``(images [B, C, H, W],
    labels [B])``, which is what :meth:`loader` uses for speed.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    name: str = "dataset"

    def __post_init__(self) -> None:
        images = check_images(self.images, "images")
        if images.dtype != torch.float32:
            images = images.to(torch.float32)
        labels = check_tensor(
            self.labels,
            "labels",
            ndim=1,
            dtypes=(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8),
        )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels has {labels.shape[0]} entries but images holds {images.shape[0]} images; "
                "they must match (images [N, C, H, W], labels [N])"
            )
        labels = labels.to(torch.int64)
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got minimum {int(labels.min())}")
        n_labels = int(labels.max()) + 1
        classes = [str(c) for c in self.classes] if self.classes else [str(k) for k in range(n_labels)]
        if n_labels > len(classes):
            raise ValueError(f"labels go up to {n_labels - 1} but only {len(classes)} class names were given")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        self.images, self.labels, self.classes = images, labels, classes

    # ------------------------------------------------------------------ basics
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index):
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return f"ImageDataset(name={self.name!r}, n={len(self)}, shape=[{c}, {h}, {w}], classes={self.num_classes})"

    # ------------------------------------------------------------- utilities
    def subset(self, n_or_indices: int | Sequence[int] | torch.Tensor, *, seed: int | None = None) -> "ImageDataset":
        """A new dataset with some of the samples (tensors are copied).

        ``subset(n)``: the first ``n`` samples, or ``n`` samples drawn without
        replacement with ``torch.Generator().manual_seed(seed)`` when ``seed``
        is given. ``subset(indices)``: exactly those samples, in that order.
        """
        n_total = len(self)
        if isinstance(n_or_indices, bool):
            raise TypeError("subset() takes an int count or a sequence of indices, got a bool")
        if isinstance(n_or_indices, int):
            n = n_or_indices
            if not 1 <= n <= n_total:
                raise ValueError(f"subset size must be in [1, {n_total}], got {n}")
            if seed is None:
                idx = torch.arange(n)
            else:
                g = torch.Generator().manual_seed(int(seed))
                idx = torch.randperm(n_total, generator=g)[:n]
        else:
            idx = torch.as_tensor(n_or_indices)
            if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
                raise ValueError("subset indices must be a non-empty 1-D sequence of ints")
            idx = idx.to(torch.long)
            if int(idx.min()) < -n_total or int(idx.max()) >= n_total:
                raise IndexError(f"subset indices out of range for a dataset of {n_total} samples")
        return ImageDataset(self.images[idx].clone(), self.labels[idx].clone(), list(self.classes), self.name)

    def loader(
        self, batch_size: int = 64, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> DataLoader:
        """A ``DataLoader`` yielding ``(images [B, C, H, W], labels [B])``.

        Batches are gathered with one tensor index (no per-sample collation),
        ``num_workers=0``. With ``shuffle`` the order comes from a generator
        seeded with ``seed``: the same sequence of epochs on every run.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if shuffle:
            sampler = RandomSampler(self, generator=torch.Generator().manual_seed(int(seed)))
        else:
            sampler = SequentialSampler(self)
        batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
        return DataLoader(self, sampler=batches, batch_size=None, num_workers=0)


def __getattr__(name: str):
    # load_dataset and DATASET_NAMES moved to maep_fast.data.registry; the old path keeps working for one
    # release. Read from the loaded package (importing the package loads the registry) rather than
    # importing the registry here, which sits above this module.
    if name in ("load_dataset", "DATASET_NAMES"):
        warnings.warn(f"maep_fast.data.dataset.{name} moved: import it from maep_fast.data", DeprecationWarning,
                      stacklevel=2)
        return getattr(sys.modules[__package__], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
