"""Checkpoints: atomic writes, clear errors on bad files, and bit-exact resumption of training."""
import os
import random

import pytest
import torch
from torch import nn

import hebbloss
from hebbloss import checkpoint


class RunningThreshold(nn.Module):
    """A stateful post signal written for this test: relu(z - theta), theta tracks the batch mean."""

    def bind(self, num_units):
        self.register_buffer("theta", torch.zeros(num_units))

    def forward(self, z):
        if self.training:
            self.theta.mul_(0.9).add_(0.1 * z.mean(0))
        return torch.relu(z - self.theta)


def build(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    plastic = hebbloss.attach(model, rule="oja", post=RunningThreshold())
    optimizer = torch.optim.Adam(plastic.plastic_parameters(), lr=1e-2)
    return model, plastic, optimizer


def train_steps(model, plastic, optimizer, generator, data, steps):
    for _ in range(steps):
        idx = torch.randperm(len(data), generator=generator)[:8]
        x = data[idx] + 0.01 * torch.randn(8, 6)  # uses the global RNG too
        model(x)
        optimizer.zero_grad()
        plastic.loss().backward()
        optimizer.step()


def test_resume_is_bit_exact(tmp_path):
    data = torch.rand(40, 6)
    model, plastic, opt = build()
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(7)
    train_steps(model, plastic, opt, gen, data, 6)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_post = {k: v.clone() for k, v in plastic.state_dict().items()}

    model, plastic, opt = build()
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(7)
    train_steps(model, plastic, opt, gen, data, 3)
    checkpoint.save(tmp_path / "c.pt", checkpoint.training_state(model, plastic, opt, gen, step=3))
    torch.manual_seed(123)  # whatever happens to the RNGs after the interruption must not matter
    plastic.remove()

    model, plastic, opt = build(seed=99)  # different initial weights: all must come from the file
    gen = torch.Generator().manual_seed(5)
    progress = checkpoint.restore_training_state(checkpoint.load(tmp_path / "c.pt"), model, plastic, opt, gen)
    assert progress == {"step": 3}
    train_steps(model, plastic, opt, gen, data, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    for k, v in plastic.state_dict().items():
        assert torch.equal(v, expected_post[k]), k
    assert any(k.endswith("theta") for k in expected_post)


def test_python_rng_restored():
    random.seed(3)
    state = checkpoint.rng_state()
    a = [random.random() for _ in range(3)]
    random.seed(4)
    checkpoint.set_rng_state(state)
    assert [random.random() for _ in range(3)] == a


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"x": torch.arange(3)})
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom while pickling")

    with pytest.raises(Exception, match="boom"):
        checkpoint.save(path, {"x": Boom()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, damage):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"x": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(200), "empty": b""}[damage])
    with pytest.raises(checkpoint.CheckpointError, match="c.pt.*corrupt or truncated"):
        checkpoint.load(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        checkpoint.load(tmp_path / "nothere.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a hebbloss checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_mismatching_checkpoint_changes_nothing(tmp_path):
    model, plastic, opt = build()
    checkpoint.save(tmp_path / "c.pt", checkpoint.training_state(model, plastic, opt))
    plastic.remove()
    torch.manual_seed(5)
    other = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))  # last layer differs
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="shape mismatches 2.weight"):
        checkpoint.restore_training_state(checkpoint.load(tmp_path / "c.pt"), other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])


def _flip(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_weights_are_refused_as_corrupt(tmp_path):
    path = tmp_path / "c.pt"
    weights = torch.arange(512, dtype=torch.float64) / 7  # written plainly: their bytes appear verbatim in the file
    checkpoint.save(path, {"w": weights})
    at = path.read_bytes().find(weights.numpy().tobytes())
    assert at > 0
    _flip(path, at + 2001)  # one byte in the middle of the weights: still a well-formed file
    with pytest.raises(checkpoint.CheckpointError, match=r"c\.pt is corrupt \(checksum mismatch\)"):
        checkpoint.load(path)


def test_any_single_flipped_byte_is_refused_or_harmless(tmp_path):
    """Every position of a small checkpoint: the load raises CheckpointError, or (a byte the reader
    never uses, e.g. zip padding) returns exactly what was saved; never other numbers."""
    path = tmp_path / "c.pt"
    state = {"w": torch.linspace(-1, 1, 24).reshape(4, 6), "step": 3, "name": "run"}
    checkpoint.save(path, state)
    original = path.read_bytes()
    for position in range(0, len(original), 3):
        path.write_bytes(original)
        _flip(path, position)
        try:
            loaded = checkpoint.load(path)
        except checkpoint.CheckpointError:
            continue
        assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3 and loaded["name"] == "run", position


def test_version_1_files_still_load(tmp_path):
    """Checkpoints written before checksums: the state itself, marked version 1 (the format before version 2 added the digest)."""
    path = tmp_path / "old.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "w": torch.ones(3), "progress": {"epoch": 2}}, path)
    state = checkpoint.load(path)
    assert torch.equal(state["w"], torch.ones(3)) and state["progress"] == {"epoch": 2}


def test_library_errors_do_not_name_command_line_flags(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        checkpoint.load(tmp_path / "nothere.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError) as bad:
        checkpoint.load(tmp_path / "bad.pt")
    for e in (missing, bad):
        assert "--" not in str(e.value)
