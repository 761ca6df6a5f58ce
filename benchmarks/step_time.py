"""Time one Hebbian step against one backprop step and a hand-written explicit update.

Hebbian step:  forward with hebbloss.attach + plastic.loss() + backward + SGD step.
Backprop step: forward + cross-entropy of a linear head + backward + SGD step, same model.
Hand-written:  forward under no_grad keeping each layer's input, then per layer the rule's update
               dW = conv_weight_grad(x, y) - S*W (aten.convolution_backward with only the weight
               output, as torch.nn.grad.conv2d_weight does) applied in place (harness.HandWritten).

benchmarks/speed.py measures the same three steps (and streaming, inference, compiled, bf16, peak
memory) on the issue-13 models; this script keeps the issue-2 models, --profile and --processes.
All three use Oja's rule with a ReLU post signal on every conv layer (the Linear head is not plastic).

    python benchmarks/step_time.py                 # prints medians and ratios, writes JSON
    python benchmarks/step_time.py --device cuda
    python benchmarks/step_time.py --profile 10    # also: torch.profiler self time per op and step, per path
    python benchmarks/step_time.py --processes 3   # medians over 3 fresh processes (their memory layouts differ)

Targets (issue 2): Hebbian <= 0.85 x backprop, Hebbian <= 1.05 x hand-written.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (the hand-written update and the round-robin timing, shared with speed.py)
import hebbloss  # noqa: E402

from hebbloss import atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.json"
LR = 1e-9  # small enough that Oja stays stable (lr * S_c << 2) for any number of timed steps


def conv3_net() -> nn.Module:
    """The 3-layer conv net of Miconi 2021's size: 100-196-400 channels, kernels 5-3-3, 32x32 input."""
    return nn.Sequential(
        nn.Conv2d(3, 100, 5), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(100, 196, 3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(196, 400, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(400, 10),
    )


def resnet18() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10)


# name -> (model factory, batch, input size): the conv net on 32x32, and resnet18 both on
# 32x32 (weight-bound: weights dominate the memory traffic) and at its native 224x224.
CONFIGS = {
    "conv3_100_196_400@32": (conv3_net, 64, 32),
    "timm_resnet18@32": (resnet18, 64, 32),
    "timm_resnet18@224": (resnet18, 16, 224),
}


def hebbian_step(model, plastic, optimizer, x, y):
    model(x)
    optimizer.zero_grad(set_to_none=True)
    plastic.loss().backward()
    optimizer.step()


def backprop_step(model, params, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def profile_steps(steps: dict, n: int) -> dict:
    """{path: {op: self CPU ms per step}} from torch.profiler over ``n`` steps of each path; the ops
    whose time differs most between the Hebbian and the hand-written step come first."""
    from torch.profiler import profile

    per_op = {}
    for path, fn in steps.items():
        with profile() as prof:
            for _ in range(n):
                fn()
        per_op[path] = {e.key: e.self_cpu_time_total / n / 1e3 for e in prof.key_averages()}
    heb, hand = per_op["hebbian_s"], per_op["hand_written_s"]
    order = sorted(set(heb) | set(hand), key=lambda op: -abs(heb.get(op, 0.0) - hand.get(op, 0.0)))
    return {path: {op: round(ops.get(op, 0.0), 3) for op in order[:25]} for path, ops in per_op.items()}


def bench_model(name, device, warmup, repeat, profile_n=0):
    factory, batch, size = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    bp_model = factory().to(device)
    bp_params = list(bp_model.parameters())
    bp_opt = torch.optim.SGD(bp_params, lr=LR)

    heb_model = factory().to(device)
    plastic = hebbloss.attach(heb_model, rule="oja", post=torch.relu, targets=nn.Conv2d)
    heb_opt = torch.optim.SGD(plastic.plastic_parameters(), lr=LR)

    hand_model = factory().to(device)
    hand = harness.HandWritten(hand_model, {n: ("oja", torch.relu) for n, m in hand_model.named_modules()
                                            if isinstance(m, nn.Conv2d)}, LR)

    steps = {
        "backprop_s": lambda: backprop_step(bp_model, bp_params, bp_opt, x, y),
        "hebbian_s": lambda: hebbian_step(heb_model, plastic, heb_opt, x, y),
        "hand_written_s": lambda: hand.step(x),
    }
    out = harness.interleaved_medians(steps, warmup, repeat, device)
    if profile_n:
        out["profile_ms_per_step"] = profile_steps(steps, profile_n)
    plastic.remove()
    out["batch"], out["input_size"] = batch, size
    out["hebbian_over_backprop"] = out["hebbian_s"] / out["backprop_s"]
    out["hebbian_over_hand_written"] = out["hebbian_s"] / out["hand_written_s"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps of each path (torch.profiler self CPU time per op, into the JSON)")
    parser.add_argument("--processes", type=int, default=1, metavar="P",
                        help="run the whole benchmark in P fresh processes and record the median of each figure")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.processes > 1:
        return across_processes(args)

    results = {}
    print(f"{'model@input':<22}{'backprop':>12}{'hebbian':>12}{'hand-written':>14}{'heb/bp':>9}{'heb/hand':>10}")
    for name in args.configs:
        r = bench_model(name, args.device, args.warmup, args.repeat, args.profile)
        results[name] = r
        print(f"{name:<22}{r['backprop_s']*1e3:>10.1f}ms{r['hebbian_s']*1e3:>10.1f}ms{r['hand_written_s']*1e3:>12.1f}ms"
              f"{r['hebbian_over_backprop']:>9.3f}{r['hebbian_over_hand_written']:>10.3f}")
        for op, heb_ms in list(r.get("profile_ms_per_step", {}).get("hebbian_s", {}).items())[:8]:
            hand_ms = r["profile_ms_per_step"]["hand_written_s"][op]
            print(f"    {op[:48]:<48} hebbian {heb_ms:8.2f} ms  hand-written {hand_ms:8.2f} ms per step")
    record = {
        "benchmark": "step_time",
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeat": args.repeat,
        "processes": 1,
        "targets": {"hebbian_over_backprop": 0.85, "hebbian_over_hand_written": 1.05},
        "models": results,
    }
    atomic.write_json(args.out, record)
    print(f"wrote {args.out}")


RATIOS = ("hebbian_over_backprop", "hebbian_over_hand_written")


def across_processes(args) -> None:
    """The benchmark in ``args.processes`` fresh processes, one after the other: per model, the median
    over processes of each path's median and of each ratio, and the ratios' range. Run-to-run spread
    on a shared CPU comes mostly from where a process's allocations land, so it is measured here."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, __file__, "--device", args.device, "--warmup", str(args.warmup),
                   "--repeat", str(args.repeat), "--configs", *args.configs, "--out", str(out)]
            if args.profile and i == 0:
                cmd += ["--profile", str(args.profile)]
            print(f"process {i + 1}/{args.processes}", flush=True)
            subprocess.run(cmd, check=True)
            runs.append(json.loads(out.read_text()))
    models = {}
    for name in args.configs:
        per = [r["models"][name] for r in runs]
        m = {k: statistics.median(p[k] for p in per) for k in ("backprop_s", "hebbian_s", "hand_written_s") + RATIOS}
        m.update(batch=per[0]["batch"], input_size=per[0]["input_size"])
        m.update({f"{k}_range": [min(p[k] for p in per), max(p[k] for p in per)] for k in RATIOS})
        if "profile_ms_per_step" in per[0]:
            m["profile_ms_per_step"] = per[0]["profile_ms_per_step"]
        models[name] = m
        print(f"{name:<22} median over {args.processes} processes: heb/bp {m[RATIOS[0]]:.3f} "
              f"(range {m[RATIOS[0] + '_range'][0]:.3f}-{m[RATIOS[0] + '_range'][1]:.3f}), heb/hand {m[RATIOS[1]]:.3f} "
              f"(range {m[RATIOS[1] + '_range'][0]:.3f}-{m[RATIOS[1] + '_range'][1]:.3f})")
    record = {**runs[0], "processes": args.processes, "models": models}
    atomic.write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
