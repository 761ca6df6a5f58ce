"""Time the whole `hebbloss run` pipeline (train -> probe -> report) as a user runs it.

Runs the installed `hebbloss` command in a subprocess, once per configuration, and records its wall
time and the layerwise table from the run's results.json in benchmarks/results/pipeline.json.
Issue 4's target: the default run (no arguments, embedded dataset) under 5 minutes on 2 CPU cores.

    python benchmarks/pipeline.py                       # the default run only
    python benchmarks/pipeline.py --cifar10 DIR         # also CIFAR-10 from DIR (e.g. ../shared/datasets)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hebbloss import atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pipeline.json"


def hebbloss_command() -> list:
    exe = shutil.which("hebbloss", path=str(Path(sys.executable).parent)) or shutil.which("hebbloss")
    return [exe] if exe else [sys.executable, "-m", "hebbloss.cli"]


def run_once(label: str, args: list) -> dict:
    """Run `hebbloss run ARGS` into a fresh folder; return its wall time and probe rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = hebbloss_command() + ["run", "--no-progress", "--out", str(out)] + args
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{label}: `{' '.join(cmd)}` failed with {done.returncode}:\n{done.stderr[-2000:]}")
        results = json.loads((out / "results.json").read_text())
    print(f"{label}: {seconds:.1f} s")
    print(done.stdout[-1500:])
    return {"args": args, "wall_seconds": seconds, "dataset": results.get("dataset"),
            "model": results.get("config", {}).get("model"), "probe": results.get("probe", {})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar10", type=Path, help="also run on CIFAR-10 from this data folder")
    parser.add_argument("--cifar10-args", nargs=argparse.REMAINDER, default=[],
                        help="extra flags for the CIFAR-10 run (e.g. --epochs 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    runs = {"default": run_once("default", [])}
    if args.cifar10:
        runs["cifar10"] = run_once("cifar10", ["--dataset", "cifar10", "--data-dir", str(args.cifar10)] + args.cifar10_args)
        runs["cifar10"]["data_dir_arg"] = str(args.cifar10)
        if list(args.cifar10.glob("cifar10/*jpg*.tar.gz")):  # the offline copy re-encodes the images as JPEG
            runs["cifar10"]["dataset_label"] = "CIFAR-10 (JPEG copy)"
    record = {
        "benchmark": "pipeline", "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "target_default_seconds": 300,
        "runs": runs,
    }
    atomic.write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
