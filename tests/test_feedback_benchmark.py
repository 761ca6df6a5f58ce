"""benchmarks/feedback.py's bookkeeping: the protocol's runs, recording each finished run, skipping what is
recorded, refusing to mix schedules, and resuming an interrupted run from its epoch checkpoint exactly."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "feedback.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("feedback_benchmark_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_protocol_runs(bench):
    specs = bench.plan(bench.ALL_MODES, [20, 8, 32], "deep_s")
    keys = [bench.run_key(s) for s in specs]
    expected = [(m, "20", "tied") for m in ("bp", "fa", "usf", "frsf", "brsf", "urfb", "kp")]
    expected += [("bp", "8", "tied"), ("fa", "8", "tied"), ("bp", "32", "tied"), ("fa", "32", "tied")]
    expected += [("urfb", "amit2019-deep_s", "tied"), ("urfb", "amit2019-deep_s", "untied")]
    assert keys == expected
    assert bench.plan(["bp"], [20], None) == [{"net": "resnet", "mode": "bp", "depth": 20, "variant": "tied"}]


def test_amits_pair_trains_at_his_ratio_of_untied_to_tied_batch(bench):
    # his deepernet_s.txt@17b91d1: batch_size 500, sparse_batch_size 50 at the same step: a tenth, for the
    # tied twin as well, so that the pair differs in the tying alone
    from hebbloss import models

    untied = {"net": "amit2019", "mode": "urfb", "depth": "amit2019-deep_s", "variant": "untied", "amit_net": "deep_s"}
    tied = {**untied, "variant": "tied"}
    deep_s = models.create("amit2019", net="deep_s")
    assert bench.batch_of(untied, deep_s, 128) == 13 and bench.batch_of(untied, deep_s, 500) == 50
    assert bench.batch_of(untied, deep_s, 4) == 1  # never 0
    assert bench.batch_of(tied, deep_s, 128) == 13 and bench.batch_of(tied, deep_s, 500) == 50
    assert bench.batch_of({"net": "resnet", "mode": "bp", "depth": 20, "variant": "tied"}, bench.CifarResNet(20), 128) == 128
    deep = models.create("amit2019", net="deep")  # his file has no sparse phase: one batch for both
    assert bench.batch_of({**untied, "amit_net": "deep"}, deep, 128) == 128


class Interrupted(Exception):
    pass


def _header(epochs=3):
    return {"benchmark": "feedback", "schedule": {"epochs": epochs, "train_subset": 0, "short": False}, "date": "x"}


def test_each_finished_run_is_recorded_and_a_recorded_run_is_skipped(bench, tmp_path):
    out = tmp_path / "results.json"
    specs = bench.plan(["bp", "fa", "usf"], [20], None)
    calls, interrupt = [], [True]

    def fake(spec, checkpoint):
        calls.append(bench.slug(spec))
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_text("epoch")  # deleted once the run is recorded
        if spec["mode"] == "usf" and interrupt:
            interrupt.clear()
            raise Interrupted("the machine went away during the second run")
        return {"test_error": 10.0 + len(calls)}

    ckpts = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        bench.run_all(specs[::2], bench.load_payload(out, _header(), False), out, fake, ckpts, log=lambda s: None)
    saved = json.loads(out.read_text())
    assert [(r["mode"], r["depth"], r["variant"], r["test_error"]) for r in saved["runs"]] == [("bp", 20, "tied", 11.0)]
    assert (ckpts / "usf-20-tied.pt").exists() and not (ckpts / "bp-20-tied.pt").exists()

    calls.clear()
    logged = []
    payload = bench.run_all(specs, bench.load_payload(out, _header(), False), out, fake, ckpts, log=logged.append)
    assert calls == ["fa-20-tied", "usf-20-tied"]  # bp was recorded: skipped
    assert logged[0] == f"bp-20-tied: recorded in {out}, skipped"
    assert [r["mode"] for r in json.loads(out.read_text())["runs"]] == ["bp", "fa", "usf"] == [r["mode"] for r in payload["runs"]]

    calls.clear()
    bench.run_all(specs, bench.load_payload(out, _header(), False), out, fake, ckpts, log=lambda s: None)
    assert calls == []


def test_a_file_of_another_schedule_is_not_mixed_with_this_one(bench, tmp_path):
    out = tmp_path / "results.json"
    out.write_text(json.dumps({**_header(epochs=4), "runs": [{"mode": "bp", "depth": 20, "test_error": 33.1}]}))
    before = out.read_text()
    with pytest.raises(SystemExit, match="another schedule \\(epochs: 4 there, 3 now\\); pass --restart"):
        bench.load_payload(out, _header(epochs=3), False)
    assert out.read_text() == before
    assert bench.load_payload(out, _header(epochs=3), True)["runs"] == []
    assert bench.load_payload(out, _header(epochs=4), False)["runs"] == [{"mode": "bp", "depth": 20, "test_error": 33.1}]


def _tiny_data():
    g = torch.Generator().manual_seed(5)
    xtr = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    ytr = torch.randint(0, 10, (40,), generator=g)
    xte = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    yte = torch.randint(0, 10, (20,), generator=g)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("spec", [
    {"net": "resnet", "mode": "urfb", "depth": 8, "variant": "tied"},
    {"net": "resnet", "mode": "brsf", "depth": 8, "variant": "tied"},  # M redrawn from a generator at every step
    {"net": "amit2019", "mode": "urfb", "depth": "amit2019-deep_s", "variant": "untied", "amit_net": "deep_s"},  # dropout
])
def test_an_interrupted_run_resumes_from_its_epoch_checkpoint_as_if_never_stopped(bench, tmp_path, spec):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = bench.parse_args(["--epochs", "3", "--batch-size", "16", "--device", "cpu"])
        data, schedule = _tiny_data(), {"epochs": 3}
        whole = bench.train_run(spec, tmp_path / "a.pt", data, args, torch.device("cpu"), schedule)
        assert bench.train_run(spec, tmp_path / "b.pt", data, args, torch.device("cpu"), schedule, stop_after=1) is None
        saved = torch.load(tmp_path / "b.pt", weights_only=False)
        assert saved["state"]["epoch"] == 1 and len(saved["state"]["losses"]) == 1
        resumed = bench.train_run(spec, tmp_path / "b.pt", data, args, torch.device("cpu"), schedule)
    finally:
        torch.set_num_threads(threads)
    for r in (whole, resumed):
        r.pop("seconds")
    assert resumed == whole and whole["epochs_done"] == 3 and len(whole["train_loss_per_epoch"]) == 3
    with pytest.raises(SystemExit, match="written for another run or schedule"):
        bench.train_run(spec, tmp_path / "b.pt", data, args, torch.device("cpu"), {"epochs": 4})


def test_the_docs_table_and_the_claims_come_from_the_json(bench, tmp_path):
    def run(mode, depth, err, variant="tied", net="resnet"):
        return {"mode": mode, "depth": depth, "variant": variant, "net": net, "test_error": err}

    runs = [run("bp", 20, 10.0), run("usf", 20, 12.5), run("urfb", 20, 14.0), run("kp", 20, 12.96), run("fa", 20, 25.0),
            run("bp", 8, 15.0), run("fa", 8, 30.0), run("bp", 32, 9.0), run("fa", 32, 35.0),
            run("urfb", "amit2019-deep_s", 30.0, "tied", "amit2019"),
            {**run("urfb", "amit2019-deep_s", 34.5, "untied", "amit2019"), "batch_size": 13}]
    data = {"schedule": {"epochs": 8, "train_subset": 0, "train_images": 50000, "test_images": 10000, "batch_size": 128,
                         "lr": 0.1, "lr_schedule": "cosine", "weight_decay": 5e-4, "augment": True, "seed": 0, "short": False},
            "device": "cpu", "date": "d", "torch": "t", "dataset": "CIFAR-10", "runs": runs,
            "published": {"source": "BioTorch", "errors": {"bp": 8.63}}}
    results, docs = tmp_path / "r.json", tmp_path / "feedback.md"
    results.write_text(json.dumps(data))
    docs.write_text(f"# Page\n\nabove\n\n{bench.BEGIN}\nold\n{bench.END}\n\nbelow\n")
    block = bench.render_docs(results, docs, short_path=None)
    text = docs.read_text()
    assert text.startswith("# Page\n\nabove\n\n") and text.endswith("\n\nbelow\n") and "old" not in text
    assert "| bp | 15.0 | 10.0 | 9.0 | 8.63 |" in block
    assert "| amit2019-deep_s | 30.0 (batch 128) | 34.5 (batch 13) |" in block  # a run's own batch, else the schedule's
    assert "- usf within 3 points of bp at ResNet-20 (Moskovitz et al. 2018): +2.50 points, met." in block
    assert "- urfb within 3 points of bp at ResNet-20 (Amit 2019): +4.00 points, missed by 1.00." in block
    assert "- kp within 3 points of bp at ResNet-20 (Akrout et al. 2019): +2.96 points, met." in block
    assert "- fa at least 10 points worse than bp at ResNet-20: +15.00 points, met." in block
    assert "fa 30.0 -> 35.0, bp 15.0 -> 9.0 from ResNet-8 to ResNet-32, met." in block
    assert "- untied within 3 points of tied on amit2019-deep_s under urfb (Amit 2019): +4.50 points, missed by 1.50." in block
    assert "All 50,000 training images, but 8 epochs" in block and "short schedule" not in block
    runs[-1]["test_error"] = 25.0  # untied 5 points better than tied: outside the two-sided band, said so
    results.write_text(json.dumps(data))
    block = bench.render_docs(results, docs, short_path=None)
    assert ("- untied within 3 points of tied on amit2019-deep_s under urfb (Amit 2019): -5.00 points, missed by 2.00 "
            "(the untied run is the better one).") in block


def test_a_partial_full_data_table_marks_the_runs_not_yet_run_and_keeps_the_short_schedule_below(bench, tmp_path):
    def schedule(images, short):
        return {"epochs": 4, "train_subset": 0 if not short else images, "train_images": images, "test_images": 10000,
                "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "augment": True, "seed": 0, "short": short}

    def payload(images, short, runs):
        return {"schedule": schedule(images, short), "device": "cpu", "date": "d", "torch": "t", "dataset": "CIFAR-10",
                "published": {"source": "BioTorch", "errors": {}},
                "runs": [{"mode": m, "depth": d, "variant": "tied", "net": "resnet", "test_error": e} for m, d, e in runs]}

    full, short, docs = tmp_path / "full.json", tmp_path / "short.json", tmp_path / "feedback.md"
    full.write_text(json.dumps(payload(50000, False, [("bp", 20, 20.0), ("usf", 20, 22.0)])))
    short.write_text(json.dumps(payload(20000, True, [("bp", 20, 33.0), ("fa", 8, 61.5)])))
    docs.write_text(f"{bench.BEGIN}\n{bench.END}\n")
    block = bench.render_docs(full, docs, short_path=short)
    head, tail = block.split("### The earlier short schedule")
    # the protocol: 7 modes at ResNet-20, bp and fa at 8 and 32, Amit's net tied and untied = 13 runs
    assert "2 of 13 runs recorded so far" in head
    assert "| bp | *pending* | 20.0 | *pending* |" in head and "| usf | - | 22.0 | - |" in head
    assert "| brsf | - | *pending* | - |" in head and "| amit2019-deep_s | *pending* | *pending* |" in head
    assert "- usf within 3 points of bp at ResNet-20 (Moskovitz et al. 2018): +2.00 points, met." in head
    assert "**This is a short schedule**" in tail and "pending" not in tail
    assert "| bp | - | 33.0 |" in tail and "| fa | 61.5 | - |" in tail
    # before any full-data run, the page says so and still shows the short schedule
    full.unlink()
    block = bench.render_docs(full, docs, short_path=short)
    assert "No full-data run recorded yet" in block and "| fa | 61.5 | - |" in block


def test_runs_made_elsewhere_merge_with_their_hardware_and_a_clash_changes_nothing(bench, tmp_path):
    def results(device, runs, epochs=3):
        return {**_header(epochs), "device": device, "torch": "t", "dataset": "CIFAR-10",
                "runs": [{"mode": m, "depth": d, "variant": "tied", "net": "resnet", "test_error": e} for m, d, e in runs]}

    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    ours.write_text(json.dumps(results("cpu: x86_64", [("bp", 20, 16.0)])))
    theirs.write_text(json.dumps(results("cuda: H200", [("fa", 32, 60.0), ("bp", 32, 15.0)])))
    assert bench.merge(ours, theirs) == ["fa-32-tied", "bp-32-tied"]
    merged = json.loads(ours.read_text())
    assert [(r["mode"], r["depth"], r["device"]) for r in merged["runs"]] == [
        ("bp", 20, "cpu: x86_64"), ("fa", 32, "cuda: H200"), ("bp", 32, "cuda: H200")]
    assert bench._hardware(merged) == "cpu: x86_64, torch t (bp-20-tied); cuda: H200, torch t (fa-32-tied, bp-32-tied)"
    before = ours.read_text()
    with pytest.raises(SystemExit, match="already holds fa-32-tied, bp-32-tied"):
        bench.merge(ours, theirs)
    theirs.write_text(json.dumps(results("cuda: H200", [("frsf", 20, 20.0)], epochs=4)))
    with pytest.raises(SystemExit, match="another schedule"):
        bench.merge(ours, theirs)
    assert ours.read_text() == before
