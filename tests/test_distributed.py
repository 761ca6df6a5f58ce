"""Data parallelism: two CPU processes (gloo) sharing each global batch end every step with the state one
process reaches on the whole batch.

- library: ``Plasticity.sync`` (k-WTA thresholds, in the model and in the post signal) and
  ``hebbloss.distributed.reduce_gradients`` against a float64 reference written out here, on batches of 5
  split 3 / 2 between the ranks;
- command: ``hebbloss train`` run by two processes as torchrun would start them (RANK, WORLD_SIZE,
  LOCAL_RANK; the rendezvous through HEBBLOSS_DIST_INIT=file://...), stopped with --max-steps and resumed
  by ``hebbloss run`` (train, then rank 0 probes), against one process on the same settings; the last
  batch (1 image) leaves rank 1 nothing to do.

Nothing here can race: the ranks meet through files in the test's tmp_path (``file://``, no TCP port to
pick), and each worker returns plain numpy copies, sent back through a queue (tests/workers.py); a worker
that fails sends its traceback, which the test shows.
"""
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402
import workers  # noqa: E402

WORLD = 2
DEADLINE_S = 240  # for both workers to start (spawn imports torch and hebbloss), run and report
LR, MU_MODEL, MU_POST, K_MODEL = 0.05, 2.0, 3.0, 2
BATCHES = 2


@pytest.fixture
def gloo(monkeypatch):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    interface = workers.loopback_interface()
    if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", interface)  # inherited by the spawned workers
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HEBBLOSS_DIST_INIT"):
        monkeypatch.delenv(name, raising=False)  # the reference runs as a single process


def _run_workers(target, args):
    """{rank: payload} once every worker has returned ``target(rank, *args)`` and exited."""
    return workers.run_workers(target, args, WORLD, DEADLINE_S)


# ------------------------------------------------------------------------------------------------ library
def _model():
    import hebbloss

    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(2, 4, 3),
        kwta=hebbloss.KWTA(k=K_MODEL, homeostasis=MU_MODEL, num_channels=4),  # thresholds in the model
        conv2=nn.Conv2d(4, 3, 3, padding=1),
    )).double()


def _batch(step):
    return torch.randn(5, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + step))


def _sync_worker(rank, init_file):
    import hebbloss
    from hebbloss.distributed import reduce_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        plastic = hebbloss.attach(model, rule="oja", targets=["conv2"], reduction="mean",
                                  post=hebbloss.KWTA(k=1, binary=True, homeostasis=MU_POST))
        optimizer = torch.optim.SGD(plastic.plastic_parameters(), lr=LR)
        grads = []
        for step in range(BATCHES):
            batch = _batch(step)
            mine = torch.tensor_split(batch, WORLD)[rank]  # 3 and 2 of the 5 images
            model(mine)
            optimizer.zero_grad()
            plastic.loss().backward()
            reduce_gradients(plastic.plastic_parameters(), weight=len(mine) / len(batch))
            grads.append([p.grad.numpy().copy() for p in plastic.plastic_parameters()])
            optimizer.step()
            plastic.sync(batch_size=len(mine))
        payload = {"grads": grads, "weights": [p.detach().numpy().copy() for p in plastic.plastic_parameters()],
                   "theta_model": model.kwta.theta.numpy().copy(),
                   "theta_post": plastic.posts["conv2"].theta.numpy().copy()}
    finally:
        dist.destroy_process_group()
    return payload


def _winners(u, k):
    """1 where fewer than k channels (dim 1) are larger, else 0: the k largest, written out."""
    larger = (u.unsqueeze(1) > u.unsqueeze(2)).sum(dim=2)  # [B, C, ...]: how many channels beat channel c
    return (larger < k).to(u.dtype)


def _reference():
    """Grads of each step, final (weight, bias) of conv2 and both thresholds, for one process seeing each
    whole batch of 5, in float64."""
    model = _model()
    W1, b1 = model.conv1.weight.detach().clone(), model.conv1.bias.detach().clone()
    conv2 = nn.Conv2d(4, 3, 3, padding=1).double()
    with torch.no_grad():
        conv2.weight.copy_(model.conv2.weight)
        conv2.bias.copy_(model.conv2.bias)
    theta_m, theta_p = torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    grads = []
    for step in range(BATCHES):
        x = _batch(step)
        z1 = F.conv2d(x, W1, b1)
        m1 = _winners(z1 - theta_m.view(1, -1, 1, 1), K_MODEL)
        theta_m = theta_m + MU_MODEL * (m1.mean(dim=(0, 2, 3)) - K_MODEL / 4)
        h = z1 * m1
        z2 = F.conv2d(h, conv2.weight.detach(), conv2.bias.detach(), padding=1)
        y = _winners(z2 - theta_p.view(1, -1, 1, 1), 1)
        theta_p = theta_p + MU_POST * (y.mean(dim=(0, 2, 3)) - 1 / 3)
        dW, db = reference.rule_update(conv2, h, y, z2, "oja")
        count = z2.shape[0] * z2.shape[2] * z2.shape[3]  # reduction="mean": samples x positions
        grads.append([-dW / count, -db / count])
        with torch.no_grad():
            conv2.weight += LR * dW / count
            conv2.bias += LR * db / count
    return grads, [conv2.weight.detach(), conv2.bias.detach()], theta_m, theta_p


def test_sync_and_reduce_gradients_give_the_global_batch_update(tmp_path, gloo):
    results = _run_workers(_sync_worker, (str(tmp_path / "rendezvous"),))
    grads, weights, theta_m, theta_p = _reference()
    assert theta_m.abs().max() > 0.1 and theta_p.abs().max() > 0.1  # the thresholds moved
    for rank, got in results.items():
        for step in range(BATCHES):
            for g, ref in zip(got["grads"][step], grads[step]):
                torch.testing.assert_close(torch.from_numpy(g), ref, rtol=1e-9, atol=1e-12)
        for w, ref in zip(got["weights"], weights):
            torch.testing.assert_close(torch.from_numpy(w), ref, rtol=1e-9, atol=1e-12)
        # float32 buffers
        torch.testing.assert_close(torch.from_numpy(got["theta_model"]).double(), theta_m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(got["theta_post"]).double(), theta_p, rtol=1e-5, atol=1e-6)


def test_sync_is_a_no_op_in_a_single_process():
    import hebbloss

    model = _model()
    plastic = hebbloss.attach(model, rule="oja", targets=["conv2"], post=hebbloss.KWTA(k=1, homeostasis=MU_POST))
    model(_batch(0))
    before = [model.kwta.theta.clone(), plastic.posts["conv2"].theta.clone()]
    plastic.sync(batch_size=3)
    assert torch.equal(model.kwta.theta, before[0]) and torch.equal(plastic.posts["conv2"].theta, before[1])
    assert before[0].abs().max() > 0  # the thresholds had moved, so an unwanted change would show


# ------------------------------------------------------------------------------------------------ command
ARGS = ["train", "--limit", "11", "--batch-size", "5", "--epochs", "1", "--model-arg", "channels=[4,6,8]",
        "--warmup-steps", "1", "--no-progress"]  # batches of 5, 5, 1 images: shards 3/2, 3/2, 1/0


def _cli_worker(rank, root):
    root = Path(root)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    here = root / f"rank{rank}"
    here.mkdir()
    os.chdir(here)  # the results folder "res" is relative: each rank's own, only rank 0's may appear
    import hebbloss.cli.commands as commands
    from hebbloss.cli import main

    real, final = commands.run_training, {}

    def spy(model, *args, **kwargs):  # what this rank holds when training ends
        out = real(model, *args, **kwargs)
        final["model"] = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        return out

    commands.run_training = spy
    os.environ["HEBBLOSS_DIST_INIT"] = f"file://{root / 'rendezvous-1'}"
    codes = [main([*ARGS, "--out", "res", "--max-steps", "1"])]
    listing = [sorted(os.listdir(here))]
    initial = None
    if rank == 0:  # after the warm-up step only: the initial weights
        from hebbloss import checkpoint

        initial = {k: v.numpy().copy() for k, v in checkpoint.load(here / "res" / "checkpoint.pt")["model"].items()}
    os.environ["HEBBLOSS_DIST_INIT"] = f"file://{root / 'rendezvous-2'}"
    codes.append(main(["run", "--resume", "res", "--no-progress", "--baselines", "none"]))  # trains, then rank 0 probes
    listing.append(sorted(os.listdir(here)))
    return {"codes": codes, "listing": listing, "final": final["model"], "initial": initial}


def test_torchrun_train_is_one_job_equal_to_one_process(tmp_path, gloo, monkeypatch):
    from hebbloss import checkpoint
    from hebbloss.cli import main

    monkeypatch.setenv("HEBBLOSS_CACHE", str(tmp_path / "cache"))  # shared by the workers; filled here first
    assert main([*ARGS, "--out", str(tmp_path / "one")]) == 0
    expected = checkpoint.load(tmp_path / "one" / "checkpoint.pt")["model"]

    results = _run_workers(_cli_worker, (str(tmp_path),))
    assert results[0]["codes"] == [0, 0] and results[1]["codes"] == [0, 0]
    assert results[1]["listing"] == [[], []], "rank 1 wrote files"
    assert results[0]["listing"] == [["res"], ["res"]]
    folder = tmp_path / "rank0" / "res"
    assert {"checkpoint.pt", "config.yaml", "results.json", "accuracy_per_layer.png", "filters.png"} <= set(os.listdir(folder))
    written = json.loads((folder / "results.json").read_text())
    assert written["world_size"] == 2 and written["train"]["completed"] and written["train"]["global_step"] == 3
    assert written["probe"]["layers"] == ["pool1", "pool2", "pool3"]
    assert json.loads((tmp_path / "one" / "results.json").read_text())["world_size"] == 1

    saved = checkpoint.load(folder / "checkpoint.pt")["model"]
    initial = results[0]["initial"]
    assert set(expected) == set(saved) == set(initial) and any("theta" in k for k in expected)
    for key, value in expected.items():
        moved = (value.double() - torch.from_numpy(initial[key]).double()).abs().max().item()
        assert moved > 1e-3, f"{key} did not change in training, so it cannot tell the runs apart"
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key} (rank 0's checkpoint): {m}")
        for rank in range(WORLD):
            torch.testing.assert_close(torch.from_numpy(results[rank]["final"][key]), value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{key} (rank {rank}): {m}")
