"""Atomic writes (hebbloss.atomic): the new content or the old one, never half, never a stray temporary file."""
import json
import os
import stat

import pytest

from hebbloss import atomic, checkpoint


def test_write_replaces_content_and_leaves_only_the_target(tmp_path):
    path = tmp_path / "sub" / "a.json"  # missing folders are created
    atomic.write_json(path, {"x": 1})
    atomic.write_json(path, {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert path.read_text().endswith("\n")
    assert os.listdir(path.parent) == ["a.json"]
    atomic.write_text(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode("utf-8")


def test_exception_keeps_old_content_and_no_temporary_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic.write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic.atomic_file(path) as f:
            f.write(b"new, partly written")
            f.flush()
            raise RuntimeError("half way")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_unserialisable_json_changes_nothing(tmp_path):
    path = tmp_path / "a.json"
    atomic.write_json(path, [1])
    with pytest.raises(TypeError):
        atomic.write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == [1]
    assert os.listdir(tmp_path) == ["a.json"]


def test_permissions_are_those_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    with open(plain, "w"):
        pass
    atomic.write_bytes(tmp_path / "atomic", b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_png_written_through_the_file_object(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    with atomic.atomic_file(tmp_path / "p.png") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["p.png"]


def test_checkpoint_keeps_the_old_name():
    assert checkpoint.atomic_file is atomic.atomic_file
