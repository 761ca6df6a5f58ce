"""attach under DistributedDataParallel: each rank's gradient is the average of the ranks' rule updates.

Two CPU processes (gloo backend) train one step; the reference is the rule's update on each rank's own
batch, computed in float64 by tests/reference.py and averaged here.

Nothing here can race: the ranks meet through a file in the test's tmp_path (``file://``, no TCP port
to pick), gloo talks over the loopback interface on ports the system assigns, and each worker sends
plain numpy copies back (no tensor shared through a file descriptor that dies with the worker). A
worker that fails sends its traceback, which the test shows.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402
import workers  # noqa: E402

WORLD = 2
LR = 0.01
DEADLINE_S = 240  # for both workers to start (spawn imports torch and hebbloss), train one step and report


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).double()


def _batch(rank):
    return torch.randn(3, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank, init_file):
    import hebbloss
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        plastic = hebbloss.attach(model, rule="oja", post=torch.tanh)
        ddp = DDP(model)
        optimizer = torch.optim.SGD(plastic.plastic_parameters(), lr=LR)
        ddp(_batch(rank))
        plastic.loss().backward()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        optimizer.step()
        weights = [p.detach().numpy().copy() for p in model.parameters()]
    finally:
        dist.destroy_process_group()
    return grads, weights


def _run_workers(tmp_path):
    """{rank: (grads, weights)} as float64 tensors, once every worker has reported and exited."""
    reports = workers.run_workers(_worker, (str(tmp_path / "rendezvous"),), WORLD, DEADLINE_S)
    return {r: ([torch.from_numpy(g) for g in grads], [torch.from_numpy(w) for w in weights])
            for r, (grads, weights) in reports.items()}


def test_ddp_averages_the_rule_updates_of_the_ranks(tmp_path, monkeypatch):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    interface = workers.loopback_interface()
    if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", interface)  # inherited by the spawned workers
    results = _run_workers(tmp_path)
    assert sorted(results) == list(range(WORLD))

    # reference: each rank's Oja update on its own batch, from what each layer saw, averaged over ranks
    model = _model()
    updates = []
    for rank in range(WORLD):
        x0 = _batch(rank)
        z0 = model[0](x0).detach()
        x2 = torch.relu(z0)
        z2 = model[2](x2).detach()
        dw0, db0 = reference.rule_update(model[0], x0, torch.tanh(z0), z0, "oja")
        dw2, db2 = reference.rule_update(model[2], x2, torch.tanh(z2), z2, "oja")
        updates.append([dw0, db0, dw2, db2])
    mean_update = [sum(u[i] for u in updates) / WORLD for i in range(4)]
    initial = [p.detach() for p in model.parameters()]
    for rank, (grads, weights) in results.items():
        for g, w, w0, upd in zip(grads, weights, initial, mean_update):
            torch.testing.assert_close(-g, upd, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(w, w0 + LR * upd, rtol=1e-10, atol=1e-10)
