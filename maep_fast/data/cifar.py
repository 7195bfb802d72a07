"""CIFAR-10 / CIFAR-100 from the official "python version" files, read safely.

Expected layout (as extracted from the official tarballs; maep_fast never
downloads them)::

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch[, batches.meta]
    <root>/cifar-100-python/train, test[, meta]

``root`` may be the parent directory or the batches directory itself. Each
file is a pickled dict with bytes keys: ``b'data'`` (uint8 ``[N, 3072]``,
channel-major RGB 32x32) and ``b'labels'`` (CIFAR-10) or ``b'fine_labels'``
(CIFAR-100). Every ``data_batch_<k>`` present is read, in order of ``k``.

The files are pickles, so they are read with :class:`RestrictedUnpickler`:
it resolves NO class or function except the handful numpy needs to rebuild a
plain array (the official files store ``b'data'`` as a numpy array), plus
``_codecs.encode`` restricted to latin-1 (how Python 3 protocol-2 pickles
store bytes). Anything else -- ``collections.OrderedDict``, custom classes,
``os.system`` -- is refused with a ``ValueError`` before any code runs.
"""
from __future__ import annotations

import codecs
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset

__all__ = ["load_cifar", "RestrictedUnpickler", "restricted_load", "CIFAR10_CLASSES", "CIFAR100_CLASSES"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
assert len(CIFAR100_CLASSES) == 100

_LAYOUT = {
    # name: (dir name, train files (None = data_batch_*), test file, label key, meta file, meta key, classes)
    "cifar10": ("cifar-10-batches-py", None, "test_batch", b"labels", "batches.meta", b"label_names", CIFAR10_CLASSES),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", "meta", b"fine_label_names", CIFAR100_CLASSES),
}
_NO_DOWNLOAD = "maep_fast never downloads data"


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, "latin1", errors)


def _numpy_allowlist() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core import multiarray as ma, numeric as num
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma, numeric as num  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = ma._reconstruct
        if hasattr(num, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = num._frombuffer
    return allowed


_ALLOWED = _numpy_allowlist()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except plain-numpy-array rebuilding.

    Builtin containers (dict, list, tuple), bytes, str, int and float load as
    usual; ``find_class`` raises ``pickle.UnpicklingError`` for anything not in
    a fixed allowlist (``numpy.ndarray``, ``numpy.dtype``,
    ``numpy[._]core.multiarray._reconstruct``, ``numpy[._]core.numeric._frombuffer``,
    latin-1 ``_codecs.encode``), so loading cannot run arbitrary code.
    """

    def find_class(self, module: str, name: str):  # noqa: D401
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only plain dicts/lists/bytes/ints and numpy "
                "uint8 arrays are allowed in a data file"
            ) from None

    def persistent_load(self, pid):  # pragma: no cover - defensive
        raise pickle.UnpicklingError("persistent ids are not allowed in a data file")


def restricted_load(path: str | Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding='bytes'``).

    Raises ``FileNotFoundError`` if missing, ``ValueError`` (naming the path) if
    the file is not a pickle or references a forbidden class/function.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file); {_NO_DOWNLOAD}")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a safe CIFAR pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError) as e:
        raise ValueError(f"{path}: malformed or truncated pickle ({type(e).__name__}: {e})") from None


def _find_dir(root: Path, name: str) -> Path:
    dirname, train_files, test_file, *_ = _LAYOUT[name]
    if not root.exists():
        raise FileNotFoundError(
            f"{name}: {root} does not exist; {_NO_DOWNLOAD}. Download the official CIFAR python version "
            f"yourself and extract it so that {root / dirname}/ holds "
            f"{'data_batch_1..5 and test_batch' if name == 'cifar10' else 'train and test'}"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: {root} is not a directory; {_NO_DOWNLOAD}")
    marker = train_files[0] if train_files else "data_batch_1"
    for cand in (root / dirname, root):
        if (cand / test_file).is_file() or (cand / marker).is_file():
            return cand
    raise FileNotFoundError(
        f"{name}: found neither {root / dirname} nor the batch files in {root}; {_NO_DOWNLOAD}. "
        f"Put the extracted official files at {root / dirname}/"
    )


def _batch_files(d: Path, name: str, split: str) -> list[Path]:
    _, train_files, test_file, *_ = _LAYOUT[name]
    if split == "test":
        files = [d / test_file]
    elif train_files is not None:
        files = [d / f for f in train_files]
    else:
        found = [(int(m.group(1)), p) for p in d.iterdir() if (m := re.fullmatch(r"data_batch_(\d+)", p.name))]
        files = [p for _, p in sorted(found)]
        if not files:
            raise FileNotFoundError(f"{name}: no data_batch_<k> files in {d}; {_NO_DOWNLOAD}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{name}: missing {f}; {_NO_DOWNLOAD}. Put the official files there")
    return files


def _read_batch(path: Path, label_key: bytes, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``(data uint8 [N, 3072], labels int64 [N])``."""
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    if b"data" not in obj or label_key not in obj:
        keys = sorted(repr(k) for k in obj)
        raise ValueError(f"{path}: expected keys b'data' and {label_key!r}, found {', '.join(keys)}")
    data, labels = obj[b"data"], obj[label_key]
    if isinstance(data, (bytes, bytearray)):
        if len(data) % 3072:
            raise ValueError(f"{path}: b'data' holds {len(data)} bytes, not a multiple of 3072 (3x32x32)")
        data = np.frombuffer(bytes(data), dtype=np.uint8).reshape(-1, 3072)
    elif isinstance(data, list):
        try:
            data = np.asarray(data, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"{path}: b'data' is a list that is not a rectangular array of ints") from None
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"{path}: b'data' values must be in 0..255")
        data = data.astype(np.uint8)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        what = f"{data.dtype} array" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array [N, 3072], got {what}")
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] == 0:
        raise ValueError(f"{path}: b'data' must have shape [N, 3072] with N > 0, got {list(data.shape)}")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise ValueError(f"{path}: {label_key!r} must be a list of ints")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"{path}: labels must be in 0..{n_classes - 1}, got {labels.min()}..{labels.max()}")
    return data, labels


def _read_classes(d: Path, name: str) -> list[str]:
    *_, meta_file, meta_key, default = _LAYOUT[name]
    path = d / meta_file
    if not path.is_file():
        return list(default)
    obj = restricted_load(path)
    names = obj.get(meta_key) if isinstance(obj, dict) else None
    if (
        isinstance(names, list)
        and len(names) == len(default)
        and all(isinstance(n, (bytes, str)) for n in names)
    ):
        return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    raise ValueError(f"{path}: expected {meta_key!r} to be a list of {len(default)} class names")


def load_cifar(root: str | Path, name: str = "cifar10", split: str = "train") -> ImageDataset:
    """Load CIFAR-10/100 from the official python pickles under ``root``.

    Returns images float32 ``[N, 3, 32, 32]`` in ``[0, 1]`` (uint8 / 255) and
    labels int64 ``[N]`` (fine labels for CIFAR-100), with class names from
    the meta file when present. ``name`` in ``cifar10|cifar100``, ``split``
    in ``train|test``. Missing files raise ``FileNotFoundError``, bad or
    unsafe contents ``ValueError``; nothing is ever downloaded.
    """
    if not isinstance(name, str) or name.lower().replace("-", "") not in _LAYOUT:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    name = name.lower().replace("-", "")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for {name}, got {split!r}")
    if not isinstance(root, (str, Path)):
        raise TypeError(f"root must be a str or Path, got {type(root).__name__}")
    d = _find_dir(Path(root).expanduser(), name)
    label_key = _LAYOUT[name][3]
    classes = _read_classes(d, name)
    parts = [_read_batch(f, label_key, len(classes)) for f in _batch_files(d, name, split)]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32))
    images /= 255.0
    return ImageDataset(images, torch.from_numpy(labels), classes, f"{name}-{split}")
