"""benchmarks/reproduce/miconi2021_authors.py: the author's notebook run on the shared JPEG tree, with only
the changes its docstring lists, and his ridge readout recorded per layer. A small notebook of the same
shape stands in for HebbGrad_Github.ipynb (not part of hebbloss)."""
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "reproduce"))

import miconi2021_authors as authors  # noqa: E402

# The training cell's shape: his four dataset calls, his eigen-decomposition, his epoch constant. Its
# features: layer 1 the one-hot label (separable), layer 2 a constant (no information), layer 3 the
# image's mean intensity (class 0 black, class 1 white).
CELL = """import numpy as np
import torch
import torchvision
import torchvision.transforms as transforms
NBLEARNINGEPOCHS = 20
transform_train = transforms.ToTensor()
transform_test = transforms.ToTensor()
trainset = torchvision.datasets.CIFAR10(
   root='./data', train=True, download=True, transform=transform_train)
testset = torchvision.datasets.CIFAR10(
    root='./data', train=False, download=True, transform=transform_test)
unlabset = torchvision.datasets.CIFAR10(
    root='./data', train=True, download=True, transform=transform_train)
zcaset = torchvision.datasets.CIFAR10(
    root='./data', train=True, download=True, transform=transform_train)
covt = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
(eivals, eivects) = torch.symeig(covt, eigenvectors=True)
DATASET_TYPE = type(trainset).__name__
def collect(ds):
    images, labels = zip(*[ds[i] for i in range(len(ds))])
    labels = np.array(labels)
    onehot = np.eye(10)[labels]
    kept = torch.zeros(4)
    view = kept[:2].cpu().numpy()
    kept.add_(1.0)  # on the CPU the array is a view of the tensor unless copied (his GPU run copied)
    assert view.tolist() == [0.0, 0.0]
    return [onehot], [np.ones((len(labels), 3))], [np.stack([im.mean().numpy() for im in images])[:, None, None, None]], [labels]
trainoutsq_l1, trainoutsq_l2, trainouts, traintargets = collect(trainset)
testoutsq_l1, testoutsq_l2, testouts, testtargets = collect(testset)
"""


def _notebook(path: Path, cell: str = CELL) -> Path:
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": ["# notes"]},
                                          {"cell_type": "code", "source": cell.splitlines(keepends=True)}]}))
    return path


def _archive(data_dir: Path) -> None:
    """data_dir/cifar10/cifar10-jpg.tar.gz with train/ (3 per class) and test/ (2 per class), classes
    airplane (black images) and automobile (white)."""
    from PIL import Image

    tree = data_dir / "tree"
    for split, n in (("train", 3), ("test", 2)):
        for cls, color in (("airplane", (0, 0, 0)), ("automobile", (255, 255, 255))):
            folder = tree / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), color).save(folder / f"{i:04d}.jpg")
    (data_dir / "cifar10").mkdir()
    with tarfile.open(data_dir / "cifar10" / "cifar10-jpg.tar.gz", "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")


def test_the_notebook_runs_on_the_jpeg_tree_and_his_readout_is_recorded_per_layer(tmp_path):
    _archive(tmp_path / "data")
    notebook = _notebook(tmp_path / "HebbGrad_Github.ipynb")
    root = authors.image_tree(tmp_path / "data", tmp_path / "work")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["airplane", "automobile"]
    patched = authors.patch(authors.training_cell(notebook), root / "train", root / "test", 3, notebook)
    assert "NBLEARNINGEPOCHS = 3" in patched and "symeig" not in patched and "CIFAR10(" not in patched
    assert patched.count(".cpu().numpy().copy()") == 1 and ".cpu().numpy()\n" not in patched
    namespace = authors.run_cell(patched, threads=1)
    assert namespace["DATASET_TYPE"] == "ImageFolder" and namespace["NBLEARNINGEPOCHS"] == 3
    assert len(namespace["traintargets"][0]) == 6 and len(namespace["testtargets"][0]) == 4
    # his test loader does not shuffle and his thresholds adapt during the test pass: the class-sorted
    # ImageFolder is visited in a fixed shuffled order, as torchvision's mixed CIFAR-10 test set was
    sorted_labels = [0, 0, 1, 1]  # test/airplane/0000-0001, test/automobile/0000-0001
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    assert namespace["testtargets"][0].tolist() == [sorted_labels[i] for i in order]
    assert namespace["traintargets"][0].tolist() == [0, 0, 0, 1, 1, 1]  # the training set as the tree has it
    reseeded = authors.run_cell(authors.patch(authors.training_cell(notebook), root / "train", root / "test", 3, notebook,
                                              seed=1), threads=1)
    order1 = torch.randperm(4, generator=torch.Generator().manual_seed(1)).tolist()
    assert order1 != order and reseeded["testtargets"][0].tolist() == [sorted_labels[i] for i in order1]

    rows = authors.readout_rows(namespace, 1.5, "cmd", seed=0)
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer[1]["test_accuracy"] == 100.0    # the label itself
    # a constant feature: ridge predicts the training class frequencies (a tie), argmax picks class 0,
    # which is half of the test images
    assert by_layer[2]["test_accuracy"] == 50.0
    assert by_layer[3]["test_accuracy"] == 100.0    # black vs white
    assert by_layer[3]["paper_accuracy"] == 64.55 and by_layer[1]["paper_accuracy"] is None
    assert [r["features"] for r in rows] == [10, 3, 1]

    out = tmp_path / "results"
    assert authors.main(["--notebook", str(notebook), "--data-dir", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
                         "--epochs", "3", "--threads", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "miconi2021-authors-cifar10-quick-e3-nNone.json").read_text())
    assert [(r["layer"], r["test_accuracy"]) for r in saved["rows"]] == [(1, 100.0), (2, 50.0), (3, 100.0)]
    assert "JPEG" in saved["data"] and saved["rows"][0]["variant"] == "authors-code"


def test_a_subset_tree_links_the_first_images_of_each_class(tmp_path):
    _archive(tmp_path / "data")
    small = authors.image_tree(tmp_path / "data", tmp_path / "work", per_class=1)
    assert sorted(str(p.relative_to(small)) for p in small.rglob("*.jpg")) == [
        "test/airplane/0000.jpg", "test/automobile/0000.jpg", "train/airplane/0000.jpg", "train/automobile/0000.jpg"]



def test_an_extracted_tree_under_the_data_folder_is_used_as_it_is(tmp_path):
    _archive(tmp_path / "data")
    (tmp_path / "data" / "cifar10" / "cifar10-jpg.tar.gz").unlink()
    for split in ("train", "test"):  # the tree the archive held, now in the place the registry looks
        (tmp_path / "data" / "tree" / split).rename(tmp_path / "data" / "cifar10" / split)
    root = authors.image_tree(tmp_path / "data", tmp_path / "work")
    assert root == tmp_path / "data" / "cifar10" and not (tmp_path / "work").exists()


def test_a_data_folder_without_cifar10_is_refused_with_its_path(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(SystemExit, match=str(tmp_path / "data")):
        authors.image_tree(tmp_path / "data", tmp_path / "work")

@pytest.mark.parametrize("broken, missing", [
    (CELL.replace("torch.symeig(covt, eigenvectors=True)", "torch.linalg.eigh(covt)"), "torch.symeig"),
    (CELL.replace("NBLEARNINGEPOCHS = 20", "NBLEARNINGEPOCHS = 5"), "NBLEARNINGEPOCHS = 20"),
    (CELL.replace("train=False", "train=True"), "3 train, 1 test"),
])
def test_a_notebook_of_another_version_is_refused_with_the_text_it_lacks(tmp_path, broken, missing):
    notebook = _notebook(tmp_path / "nb.ipynb", broken)
    with pytest.raises(SystemExit, match=missing.replace("(", r"\(")):
        authors.patch(authors.training_cell(notebook), tmp_path, tmp_path, 20, notebook)


def test_a_file_that_is_not_his_notebook_is_refused(tmp_path):
    bad = tmp_path / "x.ipynb"
    bad.write_text("not json")
    with pytest.raises(SystemExit, match="not a readable Jupyter notebook"):
        authors.training_cell(bad)
    with pytest.raises(SystemExit, match="no code cell sets NBLEARNINGEPOCHS"):
        authors.training_cell(_notebook(tmp_path / "y.ipynb", "print(1)\n"))
