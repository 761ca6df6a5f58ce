"""Peak memory of one training step on timm resnet18 (224x224, batch 16), each mode in a fresh process.

Modes (Oja's rule with a ReLU post signal on every Conv and Linear layer, as ``hebbloss.attach`` picks):
    hebbloss   forward with hebbloss.attach + plastic.loss().backward() + SGD step
    streaming  the same with attach(..., streaming=True): each layer's update taken in its forward
    backprop   forward + cross-entropy + backward + SGD step, same model
    inference  forward under torch.no_grad()
Peak memory of the step: on CPU the growth of the process's maximum resident set size (ru_maxrss)
during the first step, measured after the model, the batch and the optimizer exist; on CUDA
torch.cuda.max_memory_allocated() during the step minus the memory allocated before it.

    python benchmarks/memory.py                    # every mode, prints ratios to backprop, writes JSON
    python benchmarks/memory.py --device cuda
    python benchmarks/memory.py --mode streaming   # one mode in this process, prints its JSON line

:func:`peak_memory` (one mode, this process) and :func:`measure_all` (each mode in a fresh process)
are for benchmarks/speed.py to reuse. Target (issue 13): streaming <= 0.5 x backprop.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hebbloss  # noqa: E402

from hebbloss import atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
MODES = ("hebbloss", "streaming", "backprop", "inference")
MiB = 2 ** 20


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory(mode: str, model_name: str = "resnet18", size: int = 224, batch: int = 16, device: str = "cpu") -> float:
    """Peak memory (MiB) that one step of ``mode`` adds, in this process (run it in a fresh one: the
    CPU figure is a high-water mark that never goes down)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=10).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    plastic = None
    if mode in ("hebbloss", "streaming"):
        plastic = hebbloss.attach(model, rule="oja", post="relu", streaming=mode == "streaming")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _maxrss_bytes()
    if mode == "inference":
        with torch.no_grad():
            model(x)
    else:
        out = model(x)
        loss = plastic.loss() if plastic is not None else F.cross_entropy(out, labels)
        del out
        loss.backward()
        optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB
    return (_maxrss_bytes() - before) / MiB


def measure_all(model_name: str = "resnet18", size: int = 224, batch: int = 16, device: str = "cpu", modes=MODES) -> dict:
    """{mode: peak MiB}, each mode in a fresh Python process."""
    out = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--mode", mode, "--model", model_name, "--size", str(size),
               "--batch", str(batch), "--device", device]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        out[mode] = json.loads(line)["peak_mib"]
    return out


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
        "what": "peak memory of one step (MiB), each mode in a fresh process; ratios to backprop",
        "model": args.model, "image_size": args.size, "batch": args.batch, "device": args.device,
        "measure": "torch.cuda.max_memory_allocated growth" if args.device.startswith("cuda") else "ru_maxrss growth",
        "hardware": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_mib": peaks,
        "ratio_to_backprop": ratios,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
