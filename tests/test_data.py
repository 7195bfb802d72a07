"""Tests for maep_fast.data: digits, CIFAR (fake files in the official layout), image folders."""
from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from maep_fast.data import (
    ImageDataset,
    digits_split_indices,
    load_cifar,
    load_dataset,
    load_digits_dataset,
    load_image_folder,
    load_images,
    save_images,
)

# --------------------------------------------------------------------------- digits


@pytest.mark.parametrize("split,n", [("train", 1437), ("test", 360), ("all", 1797)])
def test_digits_shapes_dtype_range(split, n):
    ds = load_digits_dataset(split=split)
    assert isinstance(ds, ImageDataset)
    assert ds.images.shape == (n, 1, 16, 16)
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert ds.labels.shape == (n,)
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert float(ds.images.max()) > 0.9  # really scaled by 1/16, not 1/255
    assert ds.classes == [str(k) for k in range(10)]
    assert len(ds) == n


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_resize(size):
    ds = load_digits_dataset(image_size=size, split="test")
    assert ds.images.shape == (360, 1, size, size)
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 1.0


def test_digits_size8_is_raw_data():
    from sklearn.datasets import load_digits

    ds = load_digits_dataset(image_size=8, split="all")
    raw = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1)
    assert torch.equal(ds.images, raw)


def test_digits_split_disjoint_stratified_deterministic():
    tr, te = digits_split_indices()
    assert len(tr) == 1437 and len(te) == 360
    assert set(tr.tolist()).isdisjoint(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(1797))
    a, b = load_digits_dataset(split="train"), load_digits_dataset(split="test")
    assert set(a.labels.tolist()) == set(range(10)) == set(b.labels.tolist())
    counts = torch.bincount(b.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # ~20% of each class
    # same seed -> same split; the pinned indices guard against cross-machine drift
    tr2, te2 = digits_split_indices(seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert te[:5].tolist() == _PINNED_TEST_HEAD
    tr3, te3 = digits_split_indices(seed=1)
    assert not np.array_equal(te, te3)
    _, te4 = digits_split_indices(test_fraction=0.5)
    assert len(te4) == 899


# first test indices for seed=0, test_fraction=0.2 (numpy default_rng / PCG64 is stable across machines)
_PINNED_TEST_HEAD = [5, 9, 12, 14, 16]


def test_digits_returns_fresh_tensors():
    a = load_digits_dataset(split="train")
    a.images.zero_()
    b = load_digits_dataset(split="train")
    assert float(b.images.max()) > 0.9
    c = load_digits_dataset(split="all")
    c.images.zero_()
    assert float(load_digits_dataset(split="all").images.max()) > 0.9


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(image_size=7), ValueError),
        (dict(image_size=4), ValueError),
        (dict(image_size=16.0), TypeError),
        (dict(split="val"), ValueError),
        (dict(test_fraction=0.0), ValueError),
        (dict(test_fraction=1.0), ValueError),
        (dict(seed=-1), ValueError),
    ],
)
def test_digits_bad_args(kwargs, exc):
    with pytest.raises(exc):
        load_digits_dataset(**kwargs)


# --------------------------------------------------------------------------- ImageDataset


def _tiny(n=10, c=1, s=4):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(n, c, s, s, generator=g), torch.arange(n) % 3, ["a", "b", "c"], "tiny")


def test_dataset_getitem_subset_loader():
    ds = _tiny()
    x, y = ds[2]
    assert x.shape == (1, 4, 4) and int(y) == 2
    xb, yb = ds[[0, 1, 5]]
    assert xb.shape == (3, 1, 4, 4) and yb.tolist() == [0, 1, 2]
    sub = ds.subset(4)
    assert len(sub) == 4 and torch.equal(sub.images, ds.images[:4])
    sub2 = ds.subset([9, 0])
    assert sub2.labels.tolist() == [0, 0] and torch.equal(sub2.images[0], ds.images[9])
    r1, r2 = ds.subset(5, seed=3), ds.subset(5, seed=3)
    assert torch.equal(r1.images, r2.images)
    batches = list(ds.loader(batch_size=4, shuffle=False))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels)
    assert [b[0].shape[0] for b in ds.loader(batch_size=4, drop_last=True)] == [4, 4]
    o1 = torch.cat([b[1] for b in _tiny(n=30).loader(7, shuffle=True, seed=5)])
    o2 = torch.cat([b[1] for b in _tiny(n=30).loader(7, shuffle=True, seed=5)])
    assert torch.equal(o1, o2) and sorted(o1.tolist()) == sorted(_tiny(n=30).labels.tolist())


def test_dataset_validation():
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rank"):
        ImageDataset(torch.rand(4, 4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        ImageDataset(x * 2 + 0.5, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        ImageDataset(x, torch.zeros(4))
    with pytest.raises(ValueError, match="class names"):
        ImageDataset(x, torch.tensor([0, 1, 2, 3]), ["a", "b"])
    ds = ImageDataset(x.double(), torch.tensor([0, 1, 0, 1], dtype=torch.int32))
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64 and ds.classes == ["0", "1"]
    with pytest.raises(ValueError):
        ds.subset(0)
    with pytest.raises(IndexError):
        ds.subset([4])
    with pytest.raises(ValueError):
        ds.loader(batch_size=0)


def test_load_dataset_dispatch(tmp_path):
    ds = load_dataset("digits", split="test")
    assert ds.images.shape == (360, 1, 16, 16)
    assert load_dataset("digits", split="test", image_size=8).images.shape[-1] == 8
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="never downloads"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder")


def test_load_dataset_split_seed():
    default = load_dataset("digits", split="test")
    assert torch.equal(load_dataset("digits", split="test", split_seed=0).images, default.images)
    other_test = load_dataset("digits", split="test", split_seed=1)
    other_train = load_dataset("digits", split="train", split_seed=1)
    assert len(other_test) == 360 and len(other_train) == 1437
    # another partition of the same 1797 images: the test images differ, and the two splits still cover all
    tr, te = digits_split_indices(seed=1)
    tr0, te0 = digits_split_indices(seed=0)
    assert not np.array_equal(te, te0) and len(np.intersect1d(te, te0)) < len(te)
    assert torch.equal(other_test.images, load_digits_dataset(16, "test", seed=1).images)
    assert torch.equal(other_train.labels, load_digits_dataset(16, "train", seed=1).labels)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(1797))
    with pytest.raises(ValueError, match="split_seed"):
        load_dataset("cifar10", root="/nonexistent", split_seed=1)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("digits", split_seed=-1)


# --------------------------------------------------------------------------- CIFAR


def _fake_cifar(tmp_path: Path, name: str, n_per_batch: int = 5, as_bytes: bool = False, protocol: int = 2):
    """Write a tiny CIFAR in the official layout; returns (parent dir, expected uint8 [N,3,32,32] per split)."""
    rng = np.random.default_rng(0)
    n_cls = 10 if name == "cifar10" else 100
    key = b"labels" if name == "cifar10" else b"fine_labels"
    d = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    d.mkdir(parents=True)
    files = ["data_batch_1", "data_batch_2", "test_batch"] if name == "cifar10" else ["train", "test"]
    expected = {"train": [], "test": []}
    for f in files:
        n = n_per_batch * (2 if f == "train" else 1)
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_cls, size=n).tolist()
        obj = {b"batch_label": b"fake", key: labels, b"data": data.tobytes() if as_bytes else data}
        if name == "cifar100":
            obj[b"coarse_labels"] = [v // 5 for v in labels]
        with open(d / f, "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol)
        expected["test" if "test" in f else "train"].append((data.reshape(n, 3, 32, 32), labels))
    meta_name, meta_key = ("batches.meta", b"label_names") if name == "cifar10" else ("meta", b"fine_label_names")
    with open(d / meta_name, "wb") as fh:
        pickle.dump({meta_key: [f"c{k}".encode() for k in range(n_cls)]}, fh, protocol=protocol)
    exp = {s: (np.concatenate([a for a, _ in v]), sum((l for _, l in v), [])) for s, v in expected.items()}
    return tmp_path, d, exp


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_fake_official_layout(tmp_path, name, protocol):
    parent, batches, exp = _fake_cifar(tmp_path, name, protocol=protocol)
    for root in (parent, batches, str(parent)):
        for split in ("train", "test"):
            ds = load_cifar(root, name, split)
            data, labels = exp[split]
            assert ds.images.shape == (len(labels), 3, 32, 32) and ds.images.dtype == torch.float32
            assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels
            assert torch.allclose(ds.images, torch.from_numpy(data).float() / 255.0)
            assert ds.classes[:2] == ["c0", "c1"] and len(ds.classes) == (10 if name == "cifar10" else 100)
            assert ds.name == f"{name}-{split}"
    assert len(load_cifar(parent, name, "train")) == 10


def test_cifar_raw_bytes_data_and_load_dataset(tmp_path):
    parent, _, exp = _fake_cifar(tmp_path, "cifar10", as_bytes=True)
    ds = load_dataset("cifar10", root=parent, split="test")
    assert torch.allclose(ds.images, torch.from_numpy(exp["test"][0]).float() / 255.0)
    small = load_dataset("cifar10", root=parent, split="test", image_size=16)
    assert small.images.shape == (5, 3, 16, 16)


def _py2_style_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A protocol-2 pickle as Python 2 + numpy 1.x wrote the official files (py2 str, numpy.core paths)."""
    import struct

    def s(b):  # SHORT_BINSTRING: a Python 2 str
        return b"U" + bytes([len(b)]) + b

    n = data.shape[0]
    arr = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        + b"(K\x01K" + bytes([n]) + b"M" + struct.pack("<H", 3072) + b"\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89T" + struct.pack("<i", data.size) + data.tobytes() + b"tb"
    )
    lab = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + lab + b"u."


def test_cifar_python2_numpy_pickle(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data = np.random.default_rng(2).integers(0, 256, size=(4, 3072), dtype=np.uint8)
    (d / "test_batch").write_bytes(_py2_style_batch(data, [3, 1, 4, 1]))
    ds = load_cifar(tmp_path, "cifar10", "test")
    assert ds.labels.tolist() == [3, 1, 4, 1] and ds.classes[0] == "airplane"
    assert torch.equal(ds.images, torch.from_numpy(data).float().reshape(4, 3, 32, 32) / 255.0)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


class _Custom:
    pass


@pytest.mark.parametrize(
    "payload,needle",
    [
        (collections.OrderedDict([(b"data", b"\0" * 3072), (b"labels", [0])]), "collections.OrderedDict"),
        ({b"data": b"\0" * 3072, b"labels": [0], b"x": _Custom()}, "_Custom"),
        ({b"data": b"\0" * 3072, b"labels": [0], b"x": _Evil()}, "system"),
    ],
)
def test_cifar_refuses_class_references(tmp_path, payload, needle):
    parent, d, _ = _fake_cifar(tmp_path, "cifar10")
    with open(d / "test_batch", "wb") as fh:
        pickle.dump(payload, fh, protocol=2)
    with pytest.raises(ValueError, match="refusing") as ei:
        load_cifar(parent, "cifar10", "test")
    assert needle in str(ei.value) and "test_batch" in str(ei.value)


def test_cifar_evil_pickle_does_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    _, d, _ = _fake_cifar(tmp_path, "cifar100")
    with open(d / "test", "wb") as fh:
        pickle.dump({b"data": Touch()}, fh)
    with pytest.raises(ValueError, match="refusing"):
        load_cifar(d, "cifar100", "test")
    assert not marker.exists()


def test_cifar_missing_and_malformed(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="never downloads") as ei:
        load_cifar(missing, "cifar10", "train")
    assert str(missing) in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(empty, "cifar100", "test")
    parent, d, _ = _fake_cifar(tmp_path / "x", "cifar10")
    (d / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar(parent, "cifar10", "test")
    (d / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar(parent, "cifar10", "test")
    for bad, msg in [
        ([1, 2, 3], "dict"),
        ({b"data": b"\0" * 3072}, "keys"),
        ({b"data": b"\0" * 100, b"labels": [0]}, "3072"),
        ({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, "uint8"),
        ({b"data": b"\0" * 3072, b"labels": [0, 1]}, "labels"),
        ({b"data": b"\0" * 3072, b"labels": [10]}, "0..9"),
    ]:
        with open(d / "test_batch", "wb") as fh:
            pickle.dump(bad, fh)
        with pytest.raises(ValueError, match=msg):
            load_cifar(parent, "cifar10", "test")
    with pytest.raises(ValueError):
        load_cifar(parent, "cifar10", "val")
    with pytest.raises(ValueError):
        load_cifar(parent, "svhn", "train")


# --------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_round_trip(tmp_path, channels):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, channels, 12, 10, generator=g)
    names = ["cat", "cat", "dog", "ant", "dog", "dog"]
    paths = [tmp_path / n / f"img{i}.png" for i, n in enumerate(names)]
    save_images(x, paths)
    ds = load_image_folder(tmp_path, channels=channels)
    assert ds.classes == ["ant", "cat", "dog"]
    assert ds.images.shape == (6, channels, 12, 10) and ds.images.dtype == torch.float32
    assert ds.labels.tolist() == [0, 1, 1, 2, 2, 2]
    order = [3, 0, 1, 2, 4, 5]  # class, then file name
    assert (ds.images - x[order]).abs().max() <= 1 / 255 + 1e-6
    y = load_images(paths, channels=channels)
    assert (y - x).abs().max() <= 1 / 255 + 1e-6
    resized = load_image_folder(tmp_path, image_size=8, channels=channels)
    assert resized.images.shape == (6, channels, 8, 8)
    via = load_dataset("folder", root=tmp_path, image_size=8)
    assert via.images.shape == (6, 3, 8, 8)


def test_load_images_mixed_sizes_and_formats(tmp_path):
    from PIL import Image

    a, b = tmp_path / "a.jpg", tmp_path / "b.bmp"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(a)
    Image.new("L", (5, 5), 128).save(b)
    with pytest.raises(ValueError, match="image_size"):
        load_images([a, b])
    y = load_images([a, b], image_size=4)
    assert y.shape == (2, 3, 4, 4)
    assert abs(float(y[1].mean()) - 128 / 255) < 1e-3
    assert float(y[0, 0].min()) > 0.9 and float(y[0, 1].max()) < 0.1
    g = load_images([b], channels=1)
    assert g.shape == (1, 1, 5, 5)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class"):
        load_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="cls"):
        load_image_folder(tmp_path)
    (tmp_path / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError):
        load_image_folder(tmp_path, channels=2)
    with pytest.raises(FileNotFoundError):
        load_images([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="empty"):
        load_images([])
    with pytest.raises(TypeError):
        load_images(str(tmp_path / "a.png"))
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="paths"):
        save_images(x, [tmp_path / "one.png"])
    with pytest.raises(ValueError, match=".png"):
        save_images(x, [tmp_path / "a.jpg", tmp_path / "b.png"])
    with pytest.raises(ValueError, match="channels"):
        save_images(torch.rand(1, 2, 4, 4), [tmp_path / "c.png"])
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        save_images(x + 1, [tmp_path / "a.png", tmp_path / "b.png"])


def test_registry_table_and_import_paths():
    import warnings

    import maep_fast.data as data
    from maep_fast.data import registry

    assert data.load_dataset is registry.load_dataset and set(registry.DATASET_NAMES) == set(registry.LOADERS)
    assert registry.DATASET_NAMES == ("digits", "cifar10", "cifar100", "folder")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from maep_fast.data.dataset import ImageDataset as base  # the base class path does not warn
    assert base is ImageDataset
    with pytest.warns(DeprecationWarning, match="maep_fast.data"):
        from maep_fast.data.dataset import load_dataset as old
    assert old is registry.load_dataset
    with pytest.warns(DeprecationWarning):
        from maep_fast.data.dataset import DATASET_NAMES  # noqa: F401
    with pytest.raises(TypeError):
        load_dataset(3)
