"""Running test workers in spawned processes, shared by tests/test_ddp.py and tests/test_distributed.py.

Nothing here can race: the ranks meet through a file in the test's tmp_path (``file://``, no TCP port to
pick), gloo talks over the loopback interface on ports the system assigns, and each worker returns plain
copies, which ``_child`` sends back through a queue as (rank, payload, None), or (rank, None, traceback)
when the worker raised; the parent polls with a deadline and shows a failed worker's traceback.
"""
import faulthandler
import os
import queue as queue_module
import socket
import time
import traceback

import pytest
import torch.multiprocessing as mp


def loopback_interface():
    """Name of the loopback network interface ("lo" on Linux, "lo0" on macOS), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in names if n.startswith("lo")), None)


def _child(target, rank, args, results):
    """A worker process: send ``target(rank, *args)`` or its traceback, wait until the queue has written it,
    and leave without the interpreter's teardown.

    The teardown is skipped because torch 2.14's gloo can abort in it after ``destroy_process_group``
    ("terminate called without an active exception", exit code -6), rarely and after the results are in:
    once in a CI run, never in over 100 runs here. The worker's own work is over by then, and its exit code
    would only report torch's teardown. A crash before the report still shows, with every thread's stack.
    """
    faulthandler.enable(all_threads=True)
    code = 0
    try:
        report = (rank, target(rank, *args), None)
    except BaseException:
        report, code = (rank, None, traceback.format_exc()), 1
    results.put(report)
    results.close()
    results.join_thread()  # the report is in the pipe before the process goes
    os._exit(code)


def run_workers(target, args, world: int, deadline_s: float):
    """{rank: payload} once every worker has returned ``target(rank, *args)`` (a plain copy) and exited."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(target, r, args, results)) for r in range(world)]
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
