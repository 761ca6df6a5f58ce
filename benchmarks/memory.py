"""Peak memory of one training step on timm resnet18 (224x224, batch 16), each mode in fresh processes.

Modes (Oja's rule with a ReLU post signal on every Conv2d and Linear layer):
    hebbloss   forward with hebbloss.attach + plastic.loss().backward() + SGD step
    streaming  the same with attach(..., streaming=True): each layer's update taken in its forward
    backprop   forward + cross-entropy + backward + SGD step, same model
    inference  forward under torch.no_grad()
Peak memory of the step: harness.step_peak_mib, the median of harness.MEMORY_RUNS (3) fresh processes per mode (on Linux CPUs the peak
resident set size during the second step minus the resident set size before it; on CUDA
torch.cuda.max_memory_allocated during the second step minus the memory allocated before it).

    python benchmarks/memory.py                    # every mode, prints ratios to backprop, writes JSON
    python benchmarks/memory.py --device cuda
    python benchmarks/memory.py --mode streaming   # one mode in this process, prints its JSON line

:func:`peak_memory` (one mode, this process) and :func:`measure_all` (each mode, the median of fresh processes);
the models, steps and the measure itself are benchmarks/harness.py's, shared with benchmarks/speed.py. Target (issue 13): streaming <= 0.5 x backprop.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from hebbloss import atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
MODES = ("hebbloss", "streaming", "backprop", "inference")
STEP_OF = {"hebbloss": "hebbian", "streaming": "streaming", "backprop": "backprop", "inference": "inference"}  # harness's names


def peak_memory(mode: str, model_name: str = "resnet18", size: int = 224, batch: int = 16, device: str = "cpu") -> float:
    """Peak memory (MiB) that one step of ``mode`` adds, in this process (run it in a fresh one: the
    CPU figure is a high-water mark that never goes down)."""
    step = harness.build_step(STEP_OF[mode], model_name, batch, size, device)
    return harness.step_peak_mib(step, device)


def measure_all(model_name: str = "resnet18", size: int = 224, batch: int = 16, device: str = "cpu", modes=MODES,
                runs: int = harness.MEMORY_RUNS) -> dict:
    """{mode: peak MiB}, each the median of ``runs`` fresh Python processes."""
    return {mode: harness.peak_mib_in_fresh_processes(STEP_OF[mode], model_name, batch, size, device, runs=runs)
            for mode in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="measure one mode in this process and print its JSON line")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps({"mode": args.mode, "peak_mib": peak_memory(args.mode, args.model, args.size, args.batch, args.device)}))
        return
    peaks = measure_all(args.model, args.size, args.batch, args.device)
    ratios = {m: peaks[m] / peaks["backprop"] for m in peaks}
    for m in MODES:
        print(f"{m:10s} {peaks[m]:8.1f} MiB   {ratios[m]:.2f} x backprop")
    atomic.write_json(RESULTS, {
        "benchmark": "memory",
        "what": f"peak memory of one step (MiB), each mode the median of {harness.MEMORY_RUNS} fresh processes; ratios to backprop",
        "memory_runs": harness.MEMORY_RUNS,
        "model": args.model, "image_size": args.size, "batch": args.batch, "device": args.device,
        "measure": harness.memory_measure(args.device),
        "hardware": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else harness.cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_mib": peaks,
        "ratio_to_backprop": ratios,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
