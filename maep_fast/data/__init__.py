"""Data sets for maep_fast: embedded digits, CIFAR-10/100 from local files, image folders.

Every loader returns an :class:`ImageDataset` (images float32 ``[N, C, H, W]``
in ``[0, 1]``, labels int64 ``[N]``). Nothing is ever downloaded.
"""
from .cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, RestrictedUnpickler, load_cifar, restricted_load
from .dataset import ImageDataset, resize_images
from .digits import DIGITS_CLASSES, digits_split_indices, load_digits_dataset
from .folder import IMAGE_SUFFIXES, load_image_folder, load_images, save_images
from .registry import DATASET_NAMES, LOADERS, load_dataset

__all__ = [
    "ImageDataset",
    "load_dataset",
    "resize_images",
    "DATASET_NAMES",
    "LOADERS",
    "load_digits_dataset",
    "digits_split_indices",
    "DIGITS_CLASSES",
    "load_cifar",
    "RestrictedUnpickler",
    "restricted_load",
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "load_image_folder",
    "load_images",
    "save_images",
    "IMAGE_SUFFIXES",
]
