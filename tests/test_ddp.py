"""attach under DistributedDataParallel: each rank's gradient is the average of the ranks' rule updates.

Two CPU processes (gloo backend, loopback address only) train one step; the reference is the rule's
update on each rank's own batch, computed in float64 by tests/reference.py and averaged here.
"""
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402

WORLD = 2
LR = 0.01


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).double()


def _batch(rank):
    return torch.randn(3, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank, port, queue):
    import hebbloss
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        plastic = hebbloss.attach(model, rule="oja", post=torch.tanh)
        ddp = DDP(model)
        optimizer = torch.optim.SGD(plastic.plastic_parameters(), lr=LR)
        ddp(_batch(rank))
        plastic.loss().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        queue.put((rank, grads, [p.detach().clone() for p in model.parameters()]))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_averages_the_rule_updates_of_the_ranks():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict((r, (g, w)) for r, g, w in (queue.get(timeout=100) for _ in procs))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

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
