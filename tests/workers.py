"""Running test workers in spawned processes, shared by tests/test_ddp.py and tests/test_distributed.py.

Nothing here can race: the ranks meet through a file in the test's tmp_path (``file://``, no TCP port to
pick), gloo talks over the loopback interface on ports the system assigns, and each worker sends plain
copies back through a queue as (rank, payload, None), or (rank, None, traceback) when it fails; the parent
polls with a deadline and shows a failed worker's traceback.
"""
import queue as queue_module
import socket
import time

import pytest
import torch.multiprocessing as mp


def loopback_interface():
    """Name of the loopback network interface ("lo" on Linux, "lo0" on macOS), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n.startswith("lo")), None)


def run_workers(target, args, world: int, deadline_s: float):
    """{rank: payload} once every worker has called ``target(rank, *args, results)``, reported and exited."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, results)) for r in range(world)]
    for p in procs:
        p.start()
    reports, failures, silent = {}, {}, set()
    deadline = time.monotonic() + deadline_s
    try:
        while len(reports) + len(failures) < world:
            try:
                rank, payload, error = results.get(timeout=1)
            except queue_module.Empty:
                for r, p in enumerate(procs):  # killed before it could report (a crash in C code, out of memory)
                    if p.exitcode is not None and r not in reports and r not in failures:
                        if r in silent:  # a report sent before exiting would have arrived by now
                            failures[r] = f"exited with code {p.exitcode} without a report"
                        silent.add(r)
                if time.monotonic() > deadline:
                    failures.update({r: f"no report within {deadline_s} s" for r in range(world) if r not in reports and r not in failures})
                continue
            if error is None:
                reports[rank] = payload
            else:
                failures[rank] = error
                deadline = min(deadline, time.monotonic() + 30)  # the other rank may wait on it in vain
        if failures:
            pytest.fail("\n".join(f"worker {r} failed: {failures[r]}" for r in sorted(failures)))
        for r, p in enumerate(procs):
            p.join(timeout=60)
            assert p.exitcode == 0, f"worker {r} reported its results but exited with code {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
    return reports
