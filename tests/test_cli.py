"""The `hebbloss` command on a tiny in-test dataset: training, exact resumption, and bad input that
gives a clear error and changes nothing on disk."""
import json
import os
import signal

import pytest
import torch

import hebbloss.data
import hebbloss.models
from hebbloss import checkpoint
from hebbloss.cli import main
from hebbloss.cli.preprocess import Preprocess
from hebbloss.data import ImageDataset

TINY = ["--dataset", "tiny", "--model", "miconi2021", "--model-arg", "channels=[4,6,8]", "--model-arg", "pruning=false",
        "--warmup-steps", "0", "--no-progress"]  # the recipe's 200 warm-up steps would leave these short runs untrained


def tiny_dataset(n_train=48, n_test=24):
    """Two classes of 28x28 images: a bright horizontal or vertical bar at a random place, plus noise."""
    g = torch.Generator().manual_seed(0)

    def make(n):
        labels = torch.arange(n) % 2
        images = torch.randint(0, 60, (n, 1, 28, 28), generator=g)
        where = torch.randint(4, 24, (n,), generator=g)
        for i in range(n):
            if labels[i] == 0:
                images[i, 0, where[i] - 2:where[i] + 2, :] = 250
            else:
                images[i, 0, :, where[i] - 2:where[i] + 2] = 250
        return images.to(torch.uint8), labels

    tr, te = make(n_train), make(n_test)
    return ImageDataset(tr[0], tr[1], te[0], te[1], ["horizontal", "vertical"], "tiny")


@pytest.fixture(autouse=True)
def tiny_data(monkeypatch):
    real = hebbloss.data.load_dataset

    def load(name, *args, **kwargs):
        return tiny_dataset() if name == "tiny" else real(name, *args, **kwargs)

    monkeypatch.setattr(hebbloss.data, "load_dataset", load)


def snapshot(folder):
    """Every file under folder with its bytes."""
    if not folder.exists():
        return None
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def final_weights(folder):
    return checkpoint.load(folder / "checkpoint.pt")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ training
def test_train_writes_checkpoint_config_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--batch-size", "16", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "config.yaml", "results.json"}
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["completed"] and results["train"]["global_step"] == 6  # 2 epochs x 48/16
    assert len(results["train"]["losses"]) == 2
    assert results["config"]["model_args"] == {"channels": [4, 6, 8], "pruning": False}
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["progress"]["epoch"] == 2
    thresholds = [k for k in state["model"] if k.endswith("theta")]  # Miconi's k-WTA thresholds live in the model
    assert len(thresholds) == 3 and all(state["model"][k].abs().sum() > 0 for k in thresholds)
    assert "trained 6 steps" in capsys.readouterr().out


@pytest.mark.parametrize("warmup", [3, 0])
def test_warmup_steps_adapt_thresholds_but_leave_weights(tmp_path, warmup):
    """Miconi 2021's code takes no weight step for its first 200 batches; --warmup-steps (default: the recipe's)."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--batch-size", "16", "--warmup-steps", str(warmup), "--out", str(out)]) == 0
    trained = checkpoint.load(out / "checkpoint.pt")["model"]
    fresh = hebbloss.models.miconi2021(in_channels=1, channels=(4, 6, 8), pruning=False, seed=0).state_dict()
    convs = [k for k in fresh if k.startswith("conv")]
    assert all(fresh[k].abs().sum() == 0 for k in fresh if k.endswith("theta"))
    assert all(trained[k].abs().sum() > 0 for k in trained if k.endswith("theta"))
    unchanged = [torch.equal(trained[k], fresh[k]) for k in convs]
    assert all(unchanged) if warmup == 3 else not any(unchanged)


@pytest.mark.parametrize("stop_after", [2, 3, 4])  # mid-epoch, at an epoch boundary, in the second epoch
def test_resume_after_max_steps_matches_uninterrupted(tmp_path, stop_after):
    args = [*TINY, "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "1"]
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    part = tmp_path / "part"
    assert main(["train", *args, "--out", str(part), "--max-steps", str(stop_after)]) == 0
    assert checkpoint.load(part / "checkpoint.pt")["progress"]["global_step"] == stop_after
    (part / "results.json").unlink()  # as if the first call had been killed after its checkpoint
    torch.manual_seed(1234)  # the resumed run must not depend on the state left behind
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    assert_same_weights(final_weights(part), final_weights(tmp_path / "whole"))
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["train"]
    resumed = json.loads((part / "results.json").read_text())["train"]
    assert resumed["completed"] and resumed["global_step"] == whole["global_step"] == 6
    # each epoch's mean loss covers all its steps, those of the first call included (kept in the checkpoint)
    assert len(whole["losses"]) == 2 and resumed["losses"] == pytest.approx(whole["losses"], rel=1e-12)


@pytest.mark.parametrize("extra", [
    [],  # the reference network with its recipe (SGD)
    ["--model", "timm:resnet10t", "--layers", "conv1.[036]", "layer1.*conv*", "--post", "kwta:2:0.5", "--optimizer", "sgd"],
], ids=["miconi2021", "timm"])
def test_streaming_flag_trains_the_same_weights_and_may_change_on_resume(tmp_path, monkeypatch, extra):
    """--streaming reaches attach (each loss() comes from a streaming handle), gives the weights and
    k-WTA thresholds of the normal run up to float32 rounding, is saved in config.yaml, and may be
    switched off when resuming."""
    from hebbloss.attach import Plasticity

    modes, real_loss = [], Plasticity.loss
    monkeypatch.setattr(Plasticity, "loss", lambda self: modes.append(self.streaming) or real_loss(self))
    base = TINY if not extra else ["--dataset", "tiny", "--no-progress"]
    args = [*base, "--epochs", "2", "--batch-size", "16", *extra]
    assert main(["train", *args, "--out", str(tmp_path / "normal")]) == 0
    assert set(modes) == {False}
    modes.clear()
    assert main(["train", *args, "--streaming", "--out", str(tmp_path / "streaming")]) == 0
    assert set(modes) == {True} and len(modes) == 6
    import yaml

    assert yaml.safe_load((tmp_path / "streaming" / "config.yaml").read_text())["streaming"] is True
    assert yaml.safe_load((tmp_path / "normal" / "config.yaml").read_text())["streaming"] is False
    part = tmp_path / "part"
    assert main(["train", *args, "--streaming", "--max-steps", "2", "--out", str(part)]) == 0
    modes.clear()
    assert main(["train", "--resume", str(part), "--no-streaming", "--no-progress"]) == 0
    assert set(modes) == {False} and len(modes) == 4
    normal = checkpoint.load(tmp_path / "normal" / "checkpoint.pt")
    for run in ("streaming", "part"):
        other = checkpoint.load(tmp_path / run / "checkpoint.pt")
        for part_of in ("model", "plastic"):
            assert normal[part_of].keys() == other[part_of].keys()
            for k, v in normal[part_of].items():
                torch.testing.assert_close(other[part_of][k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{run} {k}: {m}")


def test_ctrl_c_stops_with_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    # interrupted in step 4 of a 5-step warm-up: the resumed run must still know where the warm-up ends
    args = [*TINY, "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "100", "--warmup-steps", "5"]
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = Preprocess.forward, []

    def interrupt_on_fourth_batch(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 4
        return real(*a, **k)

    monkeypatch.setattr(Preprocess, "forward", interrupt_on_fourth_batch)
    part = tmp_path / "part"
    assert main(["train", *args, "--out", str(part)]) == 130
    assert checkpoint.load(part / "checkpoint.pt")["progress"]["global_step"] == 4  # step 4 finished, then stopped
    monkeypatch.setattr(Preprocess, "forward", real)
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    assert_same_weights(final_weights(part), final_weights(tmp_path / "whole"))


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: tiny\nmodel: miconi2021\nmodel-args: {channels: [4, 6, 8], pruning: false}\nepochs: 3\nbatch_size: 24\nprogress: false\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["epochs"] == 1  # the flag wins over the file
    assert results["train"]["global_step"] == 2  # batch size 24 from the file


def test_timm_model_with_rule_post_prune_and_layer_lr(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--dataset", "tiny", "--model", "timm:resnet10t", "--probe-layers", "layer1", "--pool", "global", "--layers", "conv1.[036]", "layer1.*conv*",
            "--rule", "oja", "--post", "kwta:2:0.5", "--prune", "0.5", "--lr", "1e-3", "--layer-lr", "conv1.0=0.01",
            "--epochs", "1", "--batch-size", "24", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    state = checkpoint.load(out / "checkpoint.pt")
    lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]
    assert lrs[0] == 0.01 and set(lrs[1:]) == {1e-3}
    masks = {k: v for k, v in state["model"].items() if k.endswith("weight_mask")}
    assert "conv1.0.weight_mask" not in masks and len(masks) >= 2  # every plastic layer after the first is pruned
    for k, mask in masks.items():
        assert abs(mask.float().mean().item() - 0.5) < 0.05, k
        assert (state["model"][k.replace("_mask", "_orig")] * mask == 0).sum() >= (mask == 0).sum()
    assert any(k.endswith("theta") for k in state["plastic"])
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())  # the defaults made explicit
    assert (saved["rule"], saved["post"], saved["lr"], saved["optimizer"], saved["epochs"]) == ("oja", "kwta:2:0.5", 1e-3, "adam", 1)
    rows = json.loads((out / "results.json").read_text())["probe"]["rows"]  # a pruned model has its random twin
    assert {(r["network"], r["layer"]) for r in rows} == {("model", "layer1"), ("random", "layer1")}


# ------------------------------------------------------------------------------------------ bad input
def run_failing(argv, capsys):
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "no-such-data"], "no-such-data"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--model", "resnet-nonsense"], "--model 'resnet-nonsense' is not known; reference networks: miconi2021, softhebb"),
    (["--model", "timm:resnet1800"], "timm has no model called 'resnet1800'"),
    (["--layers", "conv9"], "conv9"),
    (["--probe-layers", "pool7"], "pool7"),
    (["--post", "wta:3"], "--post 'wta:3' is not understood"),
    (["--layer-lr", "conv7=0.1"], "layer_lr pattern 'conv7' matches none of the plastic layers: conv1, conv2, conv3"),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--feature-memory", "4X"], "--feature-memory: '4X' is not a size"),
    (["--readout-epochs", "0"], "--readout-epochs 0: must be a positive number of epochs"),
    (["--model", "timm:resnet10t", "--method", "paper"], "no paper readout is known for model 'ResNet'"),
])
def test_bad_input_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    base = {"--dataset": TINY[2:], "--model": ["--dataset", "tiny", "--no-progress"]}.get(argv[0], TINY)
    err = run_failing(["run", *base, *argv, "--out", str(out)], capsys)
    assert message in err
    assert not out.exists()


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: tiny\nlearning_rate: 0.1\n")
    err = run_failing(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert "unknown setting 'learning_rate'" in err and "valid settings are" in err
    assert not (tmp_path / "run").exists()


def test_existing_results_folder_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = snapshot(out)
    err = run_failing(["train", *TINY, "--epochs", "1", "--out", str(out)], capsys)
    assert "already exists" in err and f"--resume {out}" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_on_resume(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--max-steps", "1", "--out", str(out)]) == 0
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"not a checkpoint" * 10)
    before = snapshot(out)
    err = run_failing(["train", "--resume", str(out)], capsys)
    assert f"checkpoint {ckpt} is corrupt or truncated" in err
    assert snapshot(out) == before


def test_resume_refuses_changed_settings_and_missing_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--max-steps", "1", "--out", str(out)]) == 0
    before = snapshot(out)
    err = run_failing(["train", "--resume", str(out), "--rule", "hebb"], capsys)
    assert "cannot change rule" in err
    assert snapshot(out) == before
    err = run_failing(["train", "--resume", str(tmp_path / "nothing")], capsys)
    assert "is not a hebbloss results folder" in err
    assert not (tmp_path / "nothing").exists()


# ------------------------------------------------------------------------------------------ probe and run
def check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_run_end_to_end_then_reprobe(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--epochs", "1", "--batch-size", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pool1" in printed and "pool3" in printed and "random" in printed  # the layerwise table
    results = json.loads((out / "results.json").read_text())
    rows = results["probe"]["rows"]
    assert {(r["network"], r["layer"]) for r in rows} == {(n, f"pool{i}") for n in ("model", "random") for i in (1, 2, 3)}
    assert all(0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0 for r in rows)
    assert results["train"]["completed"] and results["config"]["zca"] is True
    check_png(out / "accuracy_per_layer.png")
    check_png(out / "filters.png")
    weights = checkpoint.load(out / "checkpoint.pt")["model"]

    assert main(["probe", "--run", str(out), "--pool", "global", "--baselines", "none", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["probe"]["pool"] == "global"
    assert {r["network"] for r in results["probe"]["rows"]} == {"model"}
    assert results["train"]["global_step"] == 3  # the training record is kept
    assert_same_weights(checkpoint.load(out / "checkpoint.pt")["model"], weights)  # probing changes no weight


@pytest.mark.parametrize("model, readout, layers, pool", [
    (["--model", "softhebb", "--model-arg", "dataset=mnist", "--model-arg", "channels=[4,6,8]"], "softhebb",
     ["pool1", "pool2", "pool3"], "flatten"),
    (TINY[2:8], "miconi", ["norm2", "norm3", "pool3"], "quadrants"),
])
def test_probe_with_the_papers_readout(tmp_path, capsys, model, readout, layers, pool):
    out = tmp_path / "paper"
    assert main(["probe", "--dataset", "tiny", *model, "--method", "paper", "--readout-epochs", "1",
                 "--feature-memory", "1K", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["probe"]["rows"]
    assert [(r["network"], r["layer"], r["method"]) for r in rows] == [(n, l, readout) for n in ("model", "random") for l in layers]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    assert results["probe"]["pool"] == pool
    assert results["config"]["method"] == "paper" and results["config"]["feature_memory"] == 1024
    assert results["config"]["readout_epochs"] == 1


def test_reprobe_a_trained_run_with_the_papers_readout_takes_its_layers_and_pooling(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--epochs", "1", "--batch-size", "16", "--pool", "global", "--baselines", "none",
                 "--out", str(out)]) == 0
    assert main(["probe", "--run", str(out), "--method", "paper", "--no-progress"]) == 0
    probe = json.loads((out / "results.json").read_text())["probe"]
    assert probe["pool"] == "quadrants"  # Miconi's, not the global pooling the run was probed with
    assert [(r["network"], r["layer"], r["method"]) for r in probe["rows"]] == [("model", l, "miconi") for l in ("norm2", "norm3", "pool3")]


def test_probe_fresh_timm_model(tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--dataset", "tiny", "--model", "timm:resnet10t", "--probe-layers", "layer1", "layer2",
                 "--pool", "global", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["layer"] for r in results["probe"]["rows"]} == {"layer1", "layer2"}
    assert results["model"]["trained"] is False and results["config"]["zca"] is False
    check_png(out / "filters.png")


def test_filter_images_of_linear_and_conv_layers():
    from torch import nn

    from hebbloss.cli.report import filter_images

    conv = nn.Conv2d(3, 5, 4)
    assert torch.equal(filter_images(conv, (3, 8, 8)), conv.weight.detach())
    lin = nn.Linear(2 * 6 * 6, 7)
    assert torch.equal(filter_images(lin, (2, 6, 6)), lin.weight.detach().reshape(7, 2, 6, 6))
    assert filter_images(nn.Linear(10, 3), (1, 28, 28)).shape == (3, 1, 1, 10)


# ------------------------------------------------------------------------------------------ traps of issue 11
PROBE_ARGS = [a for a in TINY if a not in ("--warmup-steps", "0")]  # probe takes no training flags

def test_missing_data_dir_is_refused_for_the_default_dataset(tmp_path, capsys):
    out, missing = tmp_path / "run", tmp_path / "nonexistent"
    err = run_failing(["run", "--data-dir", str(missing), "--limit", "50", "--epochs", "1", "--no-progress", "--out", str(out)], capsys)
    assert f"{missing} is not a folder (it does not exist)" in err
    assert not out.exists() and not missing.exists()


@pytest.mark.parametrize("command", ["train", "run", "probe"])
def test_a_folder_that_is_not_a_results_folder_is_not_offered_for_resuming(tmp_path, capsys, command):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not ours")
    before = snapshot(out)
    args = PROBE_ARGS if command == "probe" else [*TINY, "--epochs", "1"]
    err = run_failing([command, *args, "--out", str(out)], capsys)
    assert f"results folder {out} already exists" in err and "--resume" not in err and "--run" not in err
    assert "it has no config.yaml and no checkpoint.pt" in err and "choose another --out" in err
    assert snapshot(out) == before


def test_the_advice_for_an_existing_results_folder_works(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--max-steps", "1", "--out", str(out)]) == 0
    err = run_failing(["train", *TINY, "--epochs", "2", "--out", str(out)], capsys)
    assert f"hebbloss train --resume {out}" in err
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # the advice, followed, works
    err = run_failing(["probe", *PROBE_ARGS, "--out", str(out)], capsys)
    assert f"hebbloss probe --run {out}" in err and "--resume" not in err  # probe has no --resume
    assert main(["probe", "--run", str(out), "--baselines", "none", "--no-progress"]) == 0


def test_config_yaml_holds_the_values_the_run_used_and_reproduces_it(tmp_path):
    import yaml

    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--batch-size", "16", "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    recipe = hebbloss.models.miconi2021(in_channels=1, channels=(4, 6, 8), pruning=False, seed=0).recipe  # the reference
    assert saved["dataset"] == "tiny" and saved["epochs"] == 2 and saved["batch_size"] == 16 and saved["warmup_steps"] == 0
    assert saved["rule"] == "instar" == recipe.layers["conv1"].rule
    assert saved["lr"] == {n: lay.lr for n, lay in recipe.layers.items()}  # per layer: the recipe's rates differ
    assert saved["post"] == {n: repr(lay.post) for n, lay in recipe.layers.items()}
    assert json.loads((out / "results.json").read_text())["config"]["rule"] == "instar"
    # the file, given back as a config, builds the same run; and --resume reads it
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
    assert_same_weights(final_weights(again), final_weights(out))
    assert main(["train", "--resume", str(out), "--epochs", "3", "--no-progress"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 3
    assert checkpoint.load(out / "checkpoint.pt")["progress"]["epoch"] == 3


def test_config_yaml_post_must_describe_the_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--max-steps", "1", "--out", str(out)]) == 0
    text = (out / "config.yaml").read_text().replace("k=1", "k=2", 1)
    (tmp_path / "edited.yaml").write_text(text)
    err = run_failing(["train", "--config", str(tmp_path / "edited.yaml"), "--out", str(tmp_path / "new")], capsys)
    assert "post of layer conv1" in err and "leave post unset" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("in_channels", [1, 3])
def test_filters_plot_has_a_shared_symmetric_scale_a_colour_bar_and_readable_tiles(tmp_path, monkeypatch, in_channels):
    import math

    import numpy as np
    from torch import nn

    from hebbloss.cli import report

    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: figures.append(fig) or path)
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, 32, 5)
    report.plot_filters(conv, tmp_path / "f.png", (in_channels, 28, 28), title="conv1: learned filters")
    (fig,) = figures
    assert len(fig.axes) == 2  # the filters and their colour bar
    scale = conv.weight.detach().abs().max().item()
    colour_bar = fig.axes[1]
    assert colour_bar.get_ylim() == pytest.approx((-scale, scale), rel=1e-5)  # symmetric: 0 in the middle
    width_px = fig.get_size_inches()[0] * fig.dpi
    assert width_px / math.ceil(math.sqrt(32)) >= 60  # each tile at least 60 pixels wide (at the figure's own dpi; saved at more)
    assert "conv1: learned filters" in fig.axes[0].get_title()
    if in_channels == 1:  # the image holds the weights themselves on the shared scale, not each filter rescaled
        shown = np.asarray(fig.axes[0].images[0].get_array(), dtype=np.float64)
        values = np.sort(shown[np.isfinite(shown)])
        assert np.allclose(values, np.sort(conv.weight.detach().double().numpy().ravel()))
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_library_messages_name_no_command_line_flag():
    """Only hebbloss/cli/ speaks of flags: a library error is read by users who never ran the command."""
    import ast
    import pathlib
    import re

    import hebbloss
    from hebbloss.cli.main import build_parser

    parser = build_parser()
    flags = {opt for sub in parser._subparsers._group_actions[0].choices.values() for a in sub._actions
             for opt in a.option_strings if opt.startswith("--") and opt != "--help"}
    assert {"--resume", "--data-dir", "--max-steps"} <= flags
    root = pathlib.Path(hebbloss.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if "cli" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [f"{path.relative_to(root)}:{node.lineno}: {flag}" for flag in flags
                          if re.search(re.escape(flag) + r"(?![\w-])", node.value)]
    assert not found, found


def test_training_seconds_add_up_over_an_interruption_and_resume(tmp_path):
    part = tmp_path / "part"
    args = [*TINY, "--epochs", "2", "--batch-size", "16", "--out", str(part)]
    assert main(["train", *args, "--max-steps", "2"]) == 0
    first = json.loads((part / "results.json").read_text())["train"]
    saved = checkpoint.load(part / "checkpoint.pt")["progress"]["seconds"]
    assert first["seconds"] == first["seconds_this_call"] and 0 < saved <= first["seconds"]
    assert main(["train", "--resume", str(part), "--no-progress"]) == 0
    second = json.loads((part / "results.json").read_text())["train"]
    assert second["completed"] and second["seconds_this_call"] > 0
    assert second["seconds"] == pytest.approx(saved + second["seconds_this_call"])
