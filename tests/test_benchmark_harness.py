"""benchmarks/harness.py's hand-written update is the rule's update (so the speed benchmark compares
equal work), checked against the float64 reference of tests/reference.py; and the generated docs pages
are what benchmarks/render_docs.py makes of the committed JSON."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from reference import D, rule_update

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def harness():
    return _load("harness")


class ChannelsLastMlp(nn.Module):
    """A Linear over the channels of an NHWC tensor, as in timm's ConvNeXt blocks."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, groups=2, stride=2), ChannelsLastMlp())
    prune.random_unstructured(net[2], "weight", amount=0.5)
    return net


@pytest.mark.parametrize("rule", ["hebb", "instar", "oja", "softhebb"])
def test_hand_written_update_is_the_rule_update(harness, rule):
    net = _net()
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    layers = {"0": net[0], "2": net[2], "3.fc": net[3].fc}
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out: seen.__setitem__(m, (a[0].detach().clone(), out.detach().clone())))
             for m in layers.values()]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    expected = {}
    for name, layer in layers.items():
        inp, z = seen[layer]
        dW, db = rule_update(layer, inp.to(D), torch.relu(z).to(D), z.to(D), rule)
        if hasattr(layer, "weight_mask"):  # pruned: only the kept connections change
            dW = dW * layer.weight_mask.to(D)
        expected[name] = dW, db
    before = {n: p.detach().to(D).clone() for n, p in net.named_parameters()}
    harness.HandWritten(net, {n: (rule, torch.relu) for n in layers}, lr=1.0).step(x)
    for name, layer in layers.items():
        dW, db = expected[name]
        weight = "weight_orig" if hasattr(layer, "weight_orig") else "weight"
        got_w = getattr(layer, weight).detach().to(D) - before[f"{name}.{weight}"]
        got_b = layer.bias.detach().to(D) - before[f"{name}.bias"]
        torch.testing.assert_close(got_w, dW, rtol=1e-4, atol=1e-4 * dW.abs().max().item())
        torch.testing.assert_close(got_b, db, rtol=1e-4, atol=1e-4 * db.abs().max().item())


def test_generated_pages_match_the_committed_json():
    render_docs = _load("render_docs")
    root = BENCHMARKS.parent
    assert render_docs.render() == (root / "docs" / "benchmarks.md").read_text()
    assert render_docs.performance_from_results() == (root / "docs" / "performance.md").read_text()


def test_performance_page_says_when_there_are_no_gpu_figures():
    render_docs = _load("render_docs")
    speed = json.loads((BENCHMARKS / "results" / "speed.json").read_text())
    speed["runs"].pop("cuda", None)
    page = render_docs.performance_page(speed)
    assert "## GPU\n\nNo GPU figures yet" in page



def test_the_hardware_line_names_the_cpu_generation_and_kernels_where_recorded(harness):
    """A vague model name ("AMD EPYC" under a hypervisor) spans generations; the family/model numbers and
    the kernels' instruction set say which one ran. Older records (name only) still render."""
    render_docs = _load("render_docs")
    hw = {"cpu": "AMD EPYC", "cpu_generation": "family 23 model 1", "cpu_capability": "AVX2", "cpu_cores": 2,
          "threads": 1, "torch": "t", "python": "p"}
    assert render_docs._hardware_line(hw) == "AMD EPYC, family 23 model 1, AVX2 kernels (2 cores, torch using 1 thread), torch t, Python p"
    old = {k: v for k, v in hw.items() if k not in ("cpu_generation", "cpu_capability")}
    assert render_docs._hardware_line(old) == "AMD EPYC (2 cores, torch using 1 thread), torch t, Python p"
    assert harness.hardware("cpu")["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "NEON", "VSX", "SVE256")

def _epoch_page(train_s, authors_code):
    """docs/performance.md made from the committed speed.json and an epoch record of 5,000 steps of 100 ms
    whose training loop took ``train_s``, beside ``authors_code``."""
    render_docs = _load("render_docs")
    speed = json.loads((BENCHMARKS / "results" / "speed.json").read_text())
    hardware = {"cpu": "test CPU", "cpu_cores": 2, "threads": 2, "torch": "x", "python": "y"}
    epoch = {"model": "softhebb", "dataset": "cifar10", "batch": 10, "hardware": hardware, "images": 50000,
             "steps": 5000, "bare_step_ms": 100.0, "bare_step_timed": {"warmup": 5, "repeat": 40},
             "bare_steps_s": 500.0, "train_s": train_s, "wall_s": 600.0, "train_over_bare_steps": train_s / 500.0,
             "target_overhead": 0.1, "command": "hebbloss train ...", "authors_code": authors_code}
    return render_docs.performance_page(speed, None, epoch)


def test_epoch_section_states_the_overhead_of_the_command_over_its_bare_steps():
    page = _epoch_page(560.0, {"model": "softhebb", "dataset": "cifar10", "batch": 10, "step_ms": 175.0,
                               "epoch_s": 870.0, "hebbloss_step_ms_then": 158.0, "source": "issue 13"})
    assert "| `hebbloss train`, training loop (results.json) | 560 | 5000 | 112.0 ms |" in page
    assert "| the authors' code (issue 13; the hebbloss step then: 158 ms, 0.90x theirs) | 870 | | 175 ms |" in page
    assert "The training loop adds +12.0 % to the bare steps (target: at most 10 %)." in page
    assert page.index("One Hebbian epoch") < page.index("## GPU")


def test_epoch_section_sets_a_measured_authors_step_beside_ours():
    page = _epoch_page(550.0, {"model": "softhebb", "dataset": "cifar10", "batch": 10, "measured": True,
                               "step_ms": 125.0, "steps_s": 625.0, "source": "demo.py"})
    assert "step x steps (timed round-robin with the bare step) | 625 | 5000 | 125.0 ms |" in page
    assert "The bare hebbloss step is 0.80x the authors' step; the training loop's epoch is 0.88x" in page


FAKE_DEMO = '''
import torch
from torch import nn, optim

class DeepSoftHebb(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(3, 2, 1) for _ in range(3))
    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            conv.weight.grad = torch.ones_like(conv.weight)
        return x

class TensorLRSGD(optim.SGD):
    pass

class WeightNormDependentLR:
    def __init__(self, *args):
        raise TypeError("built through __init__")
    def get_lr(self):
        return [group_lr * 2 for group_lr in self.initial_lr_groups]
'''


def test_the_authors_step_runs_their_classes_and_applies_their_learning_rates(tmp_path):
    epoch = _load("epoch")
    demo = tmp_path / "demo.py"
    demo.write_text(FAKE_DEMO)
    step = epoch.authors_step(demo, 2)
    step()
    step()  # the second step uses the learning rates the first one set: each group's initial lr x 2
    assert [group["lr"] for group in step.optimizer.param_groups] == [-0.16, -0.01, -0.02]
    conv1 = step.optimizer.param_groups[0]["params"][0]
    torch.manual_seed(0)
    initial = nn.Conv2d(3, 2, 1).weight  # the fake network's first layer, built from the same seed
    torch.testing.assert_close(conv1.detach(), initial.detach() + 0.08 + 0.16)  # SGD with lr < 0 on a grad of ones


def test_a_speed_run_without_bf16_and_compile_records_and_renders_them_as_not_run(capsys):
    """--no-bf16 / --no-compile (an AVX2-only CPU emulates bf16 at ~10x fp32's time): no ratio for the
    skipped modes, and the page says "not run" in their cells."""
    speed, render_docs = _load("speed"), _load("render_docs")
    t = {"hebbian": 0.9, "streaming": 0.8, "backprop": 1.5, "inference": 0.4, "hand_written": 1.0}
    r = {"model": "m", "batch": 4, "input_size": 32, "quick": False, "warmup": 1, "repeat": 1, "time_s": t}
    r["ratios"] = speed.ratios(r)
    assert "bf16_over_hebbian" not in r["ratios"] and "compiled_over_hebbian" not in r["ratios"]
    assert r["ratios"]["hebbian_over_hand_written"] == pytest.approx(0.9)
    speed.show("m/b4", r)
    assert "hebbian/hand-written 0.900" in capsys.readouterr().out
    hw = {"cpu": "c", "cpu_cores": 2, "threads": 1, "torch": "t", "python": "p"}
    page = render_docs.performance_page({"targets": speed.TARGETS, "runs": {"cpu": {"hardware": hw, "configs": {"m/b4": r}}}})
    assert "| m | 4 | 0.889 | not run | not run |" in page


def test_round_robin_timing_runs_more_rounds_until_the_timed_steps_add_up_to_min_seconds(harness, monkeypatch):
    """Each step is charged 0.1 s by a fake clock: 3 rounds of 2 steps are 0.6 s, so min_seconds=2 needs
    10 rounds; without it the 3 rounds of ``repeat``; and never more than 50x ``repeat``."""
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def step():
        clock[0] += 0.1

    for min_seconds, expected in ((0.0, 3), (2.0, 10), (1e9, 150)):
        rounds = []
        medians = harness.interleaved_medians({"a": step, "b": step}, 0, 3, "cpu", min_seconds, rounds)
        assert rounds == [expected]
        assert medians == pytest.approx({"a": 0.1, "b": 0.1})


def test_the_recipe_step_needs_a_reference_network(harness):
    """The recipe mode runs a reference network's own recipe; a model without one is refused by name."""
    with pytest.raises(ValueError, match="resnet18 has none"):
        harness.build_step("recipe", "resnet18", 1, 32)


def test_a_peak_is_the_median_of_fresh_processes_each_measuring_one_step(harness, monkeypatch):
    """Three processes reporting 1, 5 and 12 MiB give 5 (the median, not the first, the last or the mean); each is
    run with the mode and sizes asked for; and the entry point those processes run prints a peak."""
    import subprocess

    seen, peaks = [], iter([1.0, 5.0, 12.0])

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"peak_mib": next(peaks)}) + "\n")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    assert harness.peak_mib_in_fresh_processes("streaming", "resnet18", 16, 224, runs=3) == 5.0
    assert len(seen) == 3 and all(cmd[cmd.index("--peak-of") + 1] == "streaming" for cmd in seen)
    assert seen[0][seen[0].index("--batch") + 1] == "16" and seen[0][seen[0].index("--size") + 1] == "224"
    monkeypatch.undo()

    cmd = [sys.executable, str(BENCHMARKS / "harness.py"), "--peak-of", "inference", "--model", "miconi2021",
           "--batch", "2", "--size", "32", "--threads", "1"]
    line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    got = json.loads(line)
    assert got["mode"] == "inference" and got["peak_mib"] >= 0


def test_the_memory_text_says_how_many_processes_each_peak_is_the_median_of():
    render = _load("render_docs")
    assert render._memory_processes({"a": {"memory_runs": 3}, "b": {"memory_runs": 3}}) == \
        "Each mode the median of 3 fresh processes"
    assert render._memory_processes({"a": {"memory_runs": 1}}) == "Each mode in a fresh process"
    # runs that do not say, or say differently, get the words that are true of all of them
    assert render._memory_processes({"a": {"memory_runs": 3}, "b": {}}) == "Each mode in fresh processes"
    assert render._memory_processes({"a": {"memory_runs": 3}, "b": {"memory_runs": 5}}) == "Each mode in fresh processes"
