"""Step time and peak memory of a Hebbian step against backprop, inference and a hand-written update,
side by side in one process, on the Miconi 2021 and SoftHebb networks (32x32, batch 64 and 10) and on
timm resnet18 and convnext_atto (224x224, batch 32).

Modes (see benchmarks/harness.py): hebbian (attach + loss().backward() + SGD step), streaming
(attach(..., streaming=True)), backprop (linear head + cross-entropy), inference (no_grad forward),
hand_written (forward under no_grad, then one explicit weight-gradient convolution per layer for the
same rule and post signal), compiled (hebbian with the model under torch.compile), bf16 (hebbian
under torch.autocast(bfloat16)) and, on CUDA, fp16 (float16 autocast with a GradScaler). Times:
medians of steps timed round-robin in one process (at least --repeat rounds, more until the timed
steps of a model add up to --min-seconds). Peak memory: the median of --memory-runs fresh processes per mode
(harness.peak_mib_in_fresh_processes), each with one warm-up step, then one step measured by
harness.step_peak_mib (the method of benchmarks/memory.py: on Linux CPUs the peak resident set size
during the step minus the resident set size before it; torch.cuda.max_memory_allocated on CUDA); not
measured for compiled (the process would hold the compiler's own memory).

    python benchmarks/speed.py --threads 1                    # every model; writes results/speed.json
    python benchmarks/speed.py --threads 1 --quick            # timm models at batch 8, fewer repeats
    python benchmarks/speed.py --configs miconi2021/b64       # some models only (merged into the JSON)
    python benchmarks/speed.py --device cuda

Results of one device kind (cpu, cuda) are merged per model into the JSON while the hardware is the
same; other hardware replaces that device kind's figures. Targets (issue 13): Hebbian <= 0.70 x
backprop and <= 1.00 x the hand-written update.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from hebbloss import atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speed.json"
# name -> (model, batch, input size); --quick runs the 224x224 models at QUICK_BATCH
CONFIGS = {
    "miconi2021/b64": ("miconi2021", 64, 32),
    "miconi2021/b10": ("miconi2021", 10, 32),
    "softhebb/b64": ("softhebb", 64, 32),
    "softhebb/b10": ("softhebb", 10, 32),
    "resnet18/b32": ("resnet18", 32, 224),
    "convnext_atto/b32": ("convnext_atto", 32, 224),
}
QUICK_BATCH = 8
TIMED = ("hebbian", "streaming", "backprop", "inference", "hand_written", "compiled", "bf16")
MEMORY = ("hebbian", "streaming", "backprop", "inference", "hand_written", "bf16")
TARGETS = {"hebbian_over_backprop": 0.70, "hebbian_over_hand_written": 1.00}


def graph_breaks(model_name: str, size: int, device: str) -> dict:
    """torch._dynamo.explain of the Hebbian forward (hooks included): the number of graphs and graph
    breaks, and each distinct break reason (its first line and where in hebbloss it happens) with its count."""
    import torch._dynamo

    torch.manual_seed(0)
    model = harness.make_model(model_name).to(device).train()
    plastic = harness.attach(model, harness.plastic_spec(model))
    x, _ = harness.batch_of(model_name, 2, size, device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    plastic.remove()
    reasons = Counter()
    for b in explained.break_reasons:
        where = [f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in b.user_stack if "hebbloss" in f.filename]
        reasons[(str(b.reason).strip().splitlines()[0][:160], where[-1] if where else "")] += 1
    torch._dynamo.reset()
    return {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
            "reasons": [{"reason": r, "where": w, "count": c} for (r, w), c in reasons.most_common()]}


def bench(name: str, args) -> dict:
    model_name, batch, size = CONFIGS[name]
    quick = args.quick and size > 32
    if quick:
        batch = QUICK_BATCH
    warmup, repeat = (1, 3) if quick else (args.warmup, args.repeat)
    cuda = args.device.startswith("cuda")
    skipped = {m for m, skip in (("compiled", args.no_compile), ("bf16", args.no_bf16)) if skip}
    modes = [m for m in TIMED + (("fp16",) if cuda else ()) if m not in skipped]
    steps = {m: harness.build_step(m, model_name, batch, size, args.device) for m in modes}
    out = {"model": model_name, "batch": batch, "input_size": size, "quick": quick, "warmup": warmup, "repeat": repeat}
    if "compiled" in steps:
        t0 = time.perf_counter()
        steps["compiled"]()
        out["compile_first_step_s"] = time.perf_counter() - t0
    rounds = []
    out["time_s"] = harness.interleaved_medians(steps, warmup, repeat, args.device, 0.0 if quick else args.min_seconds, rounds)
    out["repeat"] = rounds[0]
    if not args.no_compile:
        out["graph_breaks"] = graph_breaks(model_name, size, args.device)
    if not args.no_memory:
        out["memory_runs"] = args.memory_runs
        out["peak_mib"] = {m: harness.peak_mib_in_fresh_processes(m, model_name, batch, size, args.device,
                                                                  torch.get_num_threads(), args.memory_runs)
                           for m in MEMORY + (("fp16",) if cuda else ()) if m not in skipped}
    out["ratios"] = ratios(out)
    return out


def ratios(r: dict) -> dict:
    t, out = r["time_s"], {}
    out["hebbian_over_backprop"] = t["hebbian"] / t["backprop"]
    out["hebbian_over_hand_written"] = t["hebbian"] / t["hand_written"]
    out["streaming_over_backprop"] = t["streaming"] / t["backprop"]
    out["inference_over_backprop"] = t["inference"] / t["backprop"]
    if "compiled" in t:
        out["compiled_over_hebbian"] = t["compiled"] / t["hebbian"]
    if "bf16" in t:
        out["bf16_over_hebbian"] = t["bf16"] / t["hebbian"]
    if "fp16" in t:
        out["fp16_over_hebbian"] = t["fp16"] / t["hebbian"]
    if "peak_mib" in r:
        m = r["peak_mib"]
        for mode in ("hebbian", "streaming", "inference", "hand_written", "bf16", "fp16"):
            if mode in m:
                out[f"{mode}_memory_over_backprop"] = m[mode] / m["backprop"]
    return out


def merged(record_path: Path, kind: str, hw: dict, configs: dict) -> dict:
    """The JSON with this run's configs merged into the device kind's figures (replaced when the
    hardware differs)."""
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.update(benchmark="speed", targets=TARGETS,
                  what="median step time (s, one process, round-robin) and peak memory of one step (MiB, median of fresh processes per mode)")
    runs = record.setdefault("runs", {})
    if kind in runs and runs[kind].get("hardware") == hw:
        runs[kind]["configs"].update(configs)
    else:
        runs[kind] = {"hardware": hw, "configs": configs}
    runs[kind]["memory_measure"] = harness.memory_measure(kind)
    runs[kind]["configs"] = {n: runs[kind]["configs"][n] for n in CONFIGS if n in runs[kind]["configs"]}
    return record


def show(name: str, r: dict) -> None:
    t, q = r["time_s"], r["ratios"]
    cells = "  ".join(f"{m} {s * 1e3:.1f}ms" for m, s in t.items())
    print(f"{name} (batch {r['batch']}, {r['input_size']}x{r['input_size']}): {cells}")
    print(f"    hebbian/backprop {q['hebbian_over_backprop']:.3f}  hebbian/hand-written {q['hebbian_over_hand_written']:.3f}"
          + (f"  compiled/eager {q['compiled_over_hebbian']:.3f}" if "compiled_over_hebbian" in q else "")
          + (f"  bf16/fp32 {q['bf16_over_hebbian']:.3f}" if "bf16_over_hebbian" in q else ""))
    if "peak_mib" in r:
        print("    peak MiB: " + "  ".join(f"{m} {v:.0f}" for m, v in r["peak_mib"].items())
              + f"   streaming/backprop memory {q['streaming_memory_over_backprop']:.3f}")
    if "graph_breaks" in r:
        g = r["graph_breaks"]
        print(f"    torch.compile: {g['graphs']} graphs, {g['breaks']} graph breaks")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--quick", action="store_true",
                        help=f"224x224 models at batch {QUICK_BATCH}, 1 warm-up and 3 timed steps (recorded per model)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds at least (every mode once a round)")
    parser.add_argument("--min-seconds", type=float, default=15.0,
                        help="more rounds (up to 50x --repeat) until the timed steps of a model add up to this")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled mode and the graph-break count")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip bf16 autocast (a CPU without bf16 instructions, e.g. AVX2 only, emulates it at ~10x fp32's time)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-runs", type=int, default=harness.MEMORY_RUNS,
                        help="fresh processes per peak (the median is kept)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    configs = {}
    for name in args.configs:
        configs[name] = bench(name, args)
        show(name, configs[name])
    atomic.write_json(args.out, merged(args.out, kind, harness.hardware(args.device), configs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
