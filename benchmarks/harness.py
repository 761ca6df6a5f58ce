"""What the speed and memory benchmarks share: the models and their plastic layers, one training step
of each mode, a hand-written explicit update, round-robin timing, peak memory of one step, and the
hardware a figure was measured on. Used by benchmarks/speed.py, benchmarks/memory.py and
benchmarks/step_time.py (``sys.path`` gets this folder; it is not part of the hebbloss package).

Modes of one step (:func:`build_step`):
    hebbian        forward with hebbloss.attach + plastic.loss().backward() + SGD step
    streaming      the same with attach(..., streaming=True)
    backprop       forward + cross-entropy of a linear head + backward + SGD step, same model
    inference      forward under torch.no_grad()
    hand_written   forward under no_grad keeping each plastic layer's input and output, then per layer
                   one explicit weight-gradient convolution (aten.convolution_backward with only the
                   weight output, as torch.nn.grad.conv2d_weight does; a matmul for Linear) for the same
                   rule and post signal: dW = sum y x - S W, applied in place
    compiled       the hebbian step with the model under torch.compile (donated buffers off)
    bf16           the hebbian step with forward and loss() under torch.autocast(bfloat16)
    fp16           (CUDA) the hebbian step under torch.autocast(float16), with a torch.amp.GradScaler
    recipe         (reference networks) the step `hebbloss train` runs: the recipe's attach and its optimizer
                   with the recipe's step hooks (SoftHebb's update scaling, Miconi's unit-norm filters)
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hebbloss  # noqa: E402

MiB = 2 ** 20
LR = 1e-9  # small enough that every rule stays stable over any number of timed steps
MODES = ("hebbian", "streaming", "backprop", "inference", "hand_written", "compiled", "bf16", "fp16", "recipe")


# ----------------------------------------------------------------------------------------------- hardware

def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (Linux; empty elsewhere)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    info = _cpuinfo()
    return info["model name"] if "model name" in info else platform.processor() or platform.machine()


def cpu_generation() -> str:
    """The CPU's family and model numbers (from /proc/cpuinfo on Linux; "" elsewhere): under a hypervisor
    the model name may be as vague as "AMD EPYC", which spans generations several times apart in speed."""
    info = _cpuinfo()
    return f"family {info['cpu family']} model {info['model']}" if "cpu family" in info and "model" in info else ""


def hardware(device: str) -> dict:
    """CPU model, its family/model numbers and the vector instructions torch's kernels use (AVX2,
    AVX512, ...), cores, torch threads, torch and Python versions, and the GPU's name on CUDA."""
    out = {"cpu": cpu_name(), "cpu_generation": cpu_generation(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def maxrss_bytes() -> int:
    """The process's maximum resident set size so far, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------- models

def _timm(name: str) -> Callable[[], nn.Module]:
    def make():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)
    return make


def _reference(name: str) -> Callable[[], nn.Module]:
    return lambda: hebbloss.models.create(name)


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "miconi2021": _reference("miconi2021"),
    "softhebb": _reference("softhebb"),
    "resnet18": _timm("resnet18"),
    "convnext_atto": _timm("convnext_atto"),
}


def make_model(name: str) -> nn.Module:
    """One of :data:`MODELS`, or any timm model by name (10 classes, random weights)."""
    return (MODELS.get(name) or _timm(name))()


def plastic_spec(model: nn.Module) -> Dict[str, Tuple[str, Callable]]:
    """{layer name: (rule, post signal)}: a reference network's recipe (Miconi: instar driven by the
    k-WTA winners; SoftHebb: softhebb driven by the soft-WTA), else Oja's rule with a ReLU post signal
    on every Conv2d and Linear layer."""
    recipe = getattr(model, "recipe", None)
    if recipe is not None:
        return {n: (lay.rule, lay.post) for n, lay in recipe.layers.items()}
    return {n: ("oja", torch.relu) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def attach(model: nn.Module, spec: Dict[str, Tuple[str, Callable]], streaming: bool = False):
    """hebbloss.attach on the layers of ``spec`` with their rules and post signals."""
    first_rule = next(iter(spec.values()))[0]
    overrides = {n: {"rule": r, "post": p} for n, (r, p) in spec.items()}
    return hebbloss.attach(model, rule=first_rule, targets=list(spec), overrides=overrides, streaming=streaming)


class WithHead(nn.Module):
    """A model without a classifier, followed by flatten + Linear (for the backprop step)."""

    def __init__(self, body: nn.Module, features: int, classes: int = 10):
        super().__init__()
        self.body, self.head = body, nn.Linear(features, classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def with_head(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` if it ends in a 10-way classifier (timm), else the model with a linear head."""
    with torch.no_grad():
        out = model(x[:1])
    if out.dim() == 2 and out.shape[1] == 10:
        return model
    return WithHead(model, out[0].numel()).to(x.device)


# ----------------------------------------------------------------------------------------------- hand-written

def _decay(rule: str, post: torch.Tensor, z: torch.Tensor, dims) -> torch.Tensor:
    """S_c of the rule, summed over ``dims``: instar y, oja y^2, softhebb y z (hebb: 0)."""
    density = {"hebb": lambda: torch.zeros_like(post), "instar": lambda: post,
               "oja": lambda: post * post, "softhebb": lambda: post * z}[rule]()
    return density.sum(dim=dims)


class HandWritten:
    """The rule's update written out without autograd, as a researcher writes it: forward under
    no_grad keeping each plastic layer's input, output and post signal (taken when the layer runs, as
    attach does, so a post reading the model's state sees it as the forward does), then per layer
    dW_c = sum y x - S_c W_c (one explicit weight-gradient convolution, or a matmul for Linear) and
    db_c = sum y - S_c b_c, added in place with rate ``lr``. A pruned layer's update is masked."""

    def __init__(self, model: nn.Module, spec: Dict[str, Tuple[str, Callable]], lr: float = LR):
        modules = dict(model.named_modules())
        self.layers = [(modules[n], rule) for n, (rule, _) in spec.items()]
        self.posts = {modules[n]: post for n, (_, post) in spec.items()}
        self.lr, self.model, self.inputs = lr, model, {}
        self.handles = [m.register_forward_hook(self._keep) for m, _ in self.layers]

    def _keep(self, module, args, output):
        self.inputs[module] = (args[0], output, self.posts[module](output))

    def remove(self):
        for h in self.handles:
            h.remove()

    @torch.no_grad()
    def step(self, x):
        self.model(x)
        for module, rule in self.layers:
            inp, z, post = self.inputs.pop(module)
            if isinstance(module, nn.Linear):
                dims = tuple(range(post.dim() - 1))
                decay = _decay(rule, post, z, dims)
                grad_w = post.reshape(-1, post.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])
                unit = decay.view(-1, 1)
            else:
                dims = (0,) + tuple(range(2, post.dim()))
                decay = _decay(rule, post, z, dims)
                padding = module.padding
                if module.padding_mode != "zeros":  # the layer pads its input itself, then convolves unpadded
                    inp = F.pad(inp, module._reversed_padding_repeated_twice, mode=module.padding_mode)
                    padding = (0,) * (inp.dim() - 2)
                grad_w = torch.ops.aten.convolution_backward(
                    post, inp, module.weight, None, module.stride, padding, module.dilation,
                    False, [0] * (inp.dim() - 2), module.groups, [False, True, False])[1]
                unit = decay.view(-1, *([1] * (grad_w.dim() - 1)))
            grad_w.sub_(unit * module.weight)
            if hasattr(module, "weight_orig"):  # torch.nn.utils.prune: the update of the kept connections
                module.weight_orig.add_(grad_w.mul_(module.weight_mask), alpha=self.lr)
            else:
                module.weight.add_(grad_w, alpha=self.lr)
            if module.bias is not None:
                module.bias.add_(post.sum(dim=dims) - decay * module.bias, alpha=self.lr)


# ----------------------------------------------------------------------------------------------- steps

def batch_of(model_name: str, batch: int, size: int, device: str, seed: int = 0):
    """A fixed random batch (images and labels) for ``model_name``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    return x, y


def build_step(mode: str, model_name: str, batch: int, size: int, device: str = "cpu") -> Callable[[], None]:
    """One training step of ``mode`` (see the module docstring) on a fresh ``model_name``, as a
    callable; everything it needs (model, batch, optimizer, hooks) is built here."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")
    torch.manual_seed(0)
    model = make_model(model_name).to(device).train()
    x, labels = batch_of(model_name, batch, size, device)
    if mode == "inference":
        def step():
            with torch.no_grad():
                model(x)
        return step
    if mode == "backprop":
        net = with_head(model, x)
        params = list(net.parameters())
        opt = torch.optim.SGD(params, lr=LR)

        def step():
            loss = F.cross_entropy(net(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    if mode == "hand_written":
        hand = HandWritten(model, plastic_spec(model))
        return lambda: hand.step(x)
    if mode == "recipe":
        recipe = getattr(model, "recipe", None)
        if recipe is None:
            raise ValueError(f"the recipe mode needs a reference network with a recipe; {model_name} has none")
        plastic = recipe.attach(model)
        opt = recipe.optimizer(plastic)
    else:
        plastic = attach(model, plastic_spec(model), streaming=mode == "streaming")
        opt = torch.optim.SGD(plastic.plastic_parameters(), lr=LR)
    if mode == "compiled":  # the plain Hebbian step keeps each layer's graph for a possible task loss, which
        from torch._functorch import config as functorch_config  # a compiled graph that donates its buffers

        functorch_config.donated_buffer = False  # refuses (see hebbloss._local)
    forward = torch.compile(model) if mode == "compiled" else model
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if mode == "fp16":
        if kind != "cuda":
            raise ValueError("the fp16 mode (float16 autocast with a GradScaler) needs a CUDA device")
        scaler = torch.amp.GradScaler("cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.float16):
                forward(x)
                loss = plastic.loss()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return step
    if mode == "bf16":

        def step():
            with torch.autocast(kind, dtype=torch.bfloat16):
                forward(x)
                loss = plastic.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def step():
        forward(x)
        opt.zero_grad(set_to_none=True)
        plastic.loss().backward()
        opt.step()
    return step


# ----------------------------------------------------------------------------------------------- measures

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def interleaved_medians(steps: dict, warmup: int, repeat: int, device: str, min_seconds: float = 0.0,
                        rounds: Optional[list] = None) -> dict:
    """Median seconds of each step, timed round-robin (rotating order) so that all see the same load:
    ``repeat`` rounds, and more (up to 50x ``repeat``) until the timed steps add up to ``min_seconds``,
    so that a short step's median rests on as many seconds of samples as a long one's. The number of
    rounds run is appended to ``rounds`` when given."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    names = list(steps)
    times = {n: [] for n in names}
    r = 0
    while r < repeat or (sum(map(sum, times.values())) < min_seconds and r < 50 * repeat):
        for n in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            steps[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
        r += 1
    if rounds is not None:
        rounds.append(r)
    return {n: statistics.median(t) for n, t in times.items()}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Give free heap pages back (glibc malloc_trim) and reset the process's peak resident set size
    (Linux: '5' into /proc/self/clear_refs); False where that is not possible."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, KeyError, AttributeError):
        return False


def memory_measure(device: str) -> str:
    """What :func:`step_peak_mib` measures on ``device``, in words (for the JSON)."""
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated growth over one step, after one warm-up step"
    if Path("/proc/self/clear_refs").exists():
        return "peak RSS minus RSS before one step, after one warm-up step, malloc_trim and a peak reset"
    return "ru_maxrss growth over the first step"


def step_peak_mib(step: Callable[[], None], device: str = "cpu") -> float:
    """Peak memory (MiB) that one call of ``step`` adds, in this process, after one warm-up call (the
    first call of a kernel holds one-time memory: code, workspaces, thread pools). On CUDA:
    torch.cuda.max_memory_allocated during the call minus the memory allocated before it. On CPU:
    the peak resident set size during the call minus the resident set size before it, after free
    heap pages are given back and the peak is reset (Linux); elsewhere the growth of ru_maxrss
    during the first call, with no warm-up (call it in a fresh process: that high-water mark never
    goes down)."""
    if device.startswith("cuda"):
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB
    if Path("/proc/self/clear_refs").exists():
        step()
    gc.collect()
    if _reset_peak_rss():
        before = _status_bytes("VmRSS")
        step()
        return (_status_bytes("VmHWM") - before) / MiB
    before = maxrss_bytes()
    step()
    return (maxrss_bytes() - before) / MiB


MEMORY_RUNS = 3  # fresh processes per peak: on a Linux CPU one step's peak RSS varies by tens of MiB from
# process to process with the allocator's choices (Miconi's network at batch 64: 89 to 135 MiB)


def peak_mib_in_fresh_processes(mode: str, model_name: str, batch: int, size: int, device: str = "cpu",
                                threads: Optional[int] = None, runs: int = MEMORY_RUNS) -> float:
    """Median over ``runs`` fresh Python processes of :func:`step_peak_mib` for one step of ``mode``
    (:func:`build_step`): each process measures its own step, so no high-water mark carries over."""
    cmd = [sys.executable, __file__, "--peak-of", mode, "--model", model_name, "--batch", str(batch),
           "--size", str(size), "--device", device] + (["--threads", str(threads)] if threads else [])
    peaks = []
    for _ in range(runs):
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        peaks.append(json.loads(line)["peak_mib"])
    return statistics.median(peaks)


if __name__ == "__main__":  # one peak, this process: what peak_mib_in_fresh_processes runs
    import argparse

    parser = argparse.ArgumentParser(description="peak memory of one step of a mode, in this process (JSON line)")
    parser.add_argument("--peak-of", required=True, choices=MODES)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    cli = parser.parse_args()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    step = build_step(cli.peak_of, cli.model, cli.batch, cli.size, cli.device)
    print(json.dumps({"mode": cli.peak_of, "peak_mib": step_peak_mib(step, cli.device)}))
