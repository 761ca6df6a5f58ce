"""The ledger of the reproduction scripts: one JSON file per experiment under
benchmarks/results/reproduce/, rows recorded as soon as a run finishes (atomically), runs already
recorded skipped, and the ``hebbloss`` command run with --resume when an earlier run was interrupted.

A row is {"model", "dataset", "variant", "layer", "readout", "seed", "test_accuracy", "paper_accuracy",
"seconds", ...}: ``layer`` is the probed block (1..N), accuracies are in percent.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hebbloss import atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
KEY = ("model", "dataset", "variant", "layer", "readout", "seed")
SHARED = ROOT.parent / "shared" / "datasets"


def hardware(threads: int, device: str = "cpu") -> Dict[str, Any]:
    """The machine a run used: CPU model and cores, torch threads, and the GPU when ``device`` is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def data_description(dataset: str, data_dir: Path) -> str:
    """Which copy of the data a run read (the shared CIFAR-10 copy is a JPEG re-encoding)."""
    if dataset == "cifar10":
        return f"CIFAR-10, the shared JPEG re-encoding of the original images ({data_dir}/cifar10/cifar10-jpg.tar.gz)"
    return f"{dataset}, the original IDX files ({data_dir}/{dataset})"


class Experiment:
    """One results file: header fields fixed at creation, rows appended one finished run at a time."""

    def __init__(self, name: str, header: Dict[str, Any], folder: Path = RESULTS):
        self.path = folder / f"{name}.json"
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {"experiment": name, **header, "rows": []}
        self.data.update({k: v for k, v in header.items() if k not in ("hardware",)})
        self.data.setdefault("hardware", header.get("hardware"))
        self.hardware = header.get("hardware")  # this process's machine: each row it records carries it

    def has(self, **key) -> bool:
        """Whether a row with these key fields is recorded."""
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.data["rows"])

    def record(self, rows: Sequence[Dict[str, Any]]) -> None:
        """Add ``rows`` (replacing recorded rows with the same key) and write the file atomically.
        The rows on disk are re-read under a lock first, so two scripts recording into the same
        experiment at once (say two variants in two processes) keep each other's rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.data["rows"] = json.loads(self.path.read_text())["rows"]
            for row in rows:
                key = {k: row[k] for k in KEY}
                self.data["rows"] = [r for r in self.data["rows"] if {k: r.get(k) for k in KEY} != key]
                self.data["rows"].append({**row, "hardware": row.get("hardware", self.hardware)})
            atomic.write_text(self.path, json.dumps(self.data, indent=1) + "\n")


def command_line(args: Sequence[str]) -> str:
    """The shell form of a ``hebbloss`` command."""
    return "hebbloss " + " ".join(shlex.quote(str(a)) for a in args)


def hebbloss(args: Sequence[str], log: Path, threads: int) -> float:
    """Run the ``hebbloss`` command with ``args`` (output appended to ``log``); its wall time in seconds.
    Raises RuntimeError naming the log when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {command_line(args)}\n")
        out.flush()
        code = subprocess.call([sys.executable, "-m", "hebbloss.cli", *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise RuntimeError(f"{command_line(args)} failed with exit code {code}; see {log}")
    return time.perf_counter() - started


def results_of(folder: Path) -> Dict[str, Any]:
    """The results.json of a ``hebbloss`` results folder ({} when absent)."""
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def train(folder: Path, args: Sequence[str], log: Path, threads: int) -> Dict[str, Any]:
    """``hebbloss train`` into ``folder``: resumed from its checkpoint when an earlier call was interrupted,
    skipped when it completed. Returns results.json's "train" entry."""
    done = results_of(folder).get("train", {})
    if done.get("completed"):
        return done
    if (folder / "checkpoint.pt").exists():
        hebbloss(["train", "--resume", folder, "--no-progress"], log, threads)
    else:
        if folder.exists():  # a folder without a checkpoint holds nothing worth keeping
            shutil.rmtree(folder)
        hebbloss(["train", *args, "--out", folder, "--no-progress"], log, threads)
    return results_of(folder)["train"]


def probe_rows(results: Dict[str, Any], network: str = "model") -> List[Dict[str, Any]]:
    """The probe rows of ``network`` in a results.json."""
    return [r for r in results.get("probe", {}).get("rows", []) if r["network"] == network]
