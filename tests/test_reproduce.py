"""benchmarks/reproduce: results recorded one run at a time and skipped when recorded; docs/results.md
generated from those files (and only from them), with the issue's targets checked against the rows."""
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "reproduce"))

import ledger  # noqa: E402
import reproduce.report as report  # noqa: E402

KEYS = {"experiment", "paper", "data", "hardware", "command", "config", "rows"}
ROW_KEYS = {"model", "dataset", "variant", "layer", "readout", "seed", "test_accuracy", "paper_accuracy", "seconds"}


def _row(variant, layer, acc, seed=0, model="softhebb", dataset="cifar10"):
    return {"model": model, "dataset": dataset, "variant": variant, "layer": layer, "readout": "paper", "seed": seed,
            "test_accuracy": acc, "paper_accuracy": None, "seconds": 1.0, "command": "hebbloss train ..."}


def test_experiment_records_replaces_and_skips(tmp_path):
    exp = ledger.Experiment("x", {"paper": "p", "data": "d", "hardware": {}, "command": "c", "config": {}}, folder=tmp_path)
    assert not exp.has(variant="depth3", seed=0)
    exp.record([_row("depth3", 3, 70.0)])
    exp.record([_row("depth3", 3, 71.0), _row("depth3", 3, 72.0, seed=1)])
    again = ledger.Experiment("x", {"paper": "p", "data": "d", "hardware": {}, "command": "c", "config": {}}, folder=tmp_path)
    assert again.has(variant="depth3", layer=3, seed=0) and again.has(seed=1) and not again.has(seed=2)
    saved = json.loads((tmp_path / "x.json").read_text())
    assert set(saved) >= KEYS
    assert sorted(r["test_accuracy"] for r in saved["rows"]) == [71.0, 72.0]  # seed 0 replaced, not duplicated
    assert not list(tmp_path.glob("*.tmp*"))


def test_two_writers_of_one_experiment_keep_each_others_rows(tmp_path):
    """Two scripts (two processes) that opened the same experiment before either recorded: each
    record re-reads the file, so the later write does not drop the earlier one's row."""
    header = {"paper": "p", "data": "d", "hardware": {}, "command": "c", "config": {}}
    first = ledger.Experiment("x", header, folder=tmp_path)
    second = ledger.Experiment("x", header, folder=tmp_path)
    first.record([_row("plain", 3, 60.0, model="miconi2021")])
    second.record([_row("triangle-pruning", 3, 64.0, model="miconi2021")])
    saved = json.loads((tmp_path / "x.json").read_text())
    assert sorted((r["variant"], r["test_accuracy"]) for r in saved["rows"]) == [("plain", 60.0), ("triangle-pruning", 64.0)]


def test_targets_are_checked_from_the_rows():
    rows = [_row("depth1", 1, 70.0), _row("depth2", 2, 75.0), _row("depth3", 3, 76.0), _row("depth3", 3, 77.5, seed=1)]
    text = "\n".join(report._softhebb_targets("cifar10", rows))
    assert f"{statistics.fmean([76.0, 77.5]):.2f} (met)" in text  # 76.75 >= 76.5
    assert "70.00 / 75.00 / 76.75 (met)" in text
    rows[2]["test_accuracy"], rows[3]["test_accuracy"] = 74.0, 75.0
    text = "\n".join(report._softhebb_targets("cifar10", rows))
    assert "74.50 (missed by 2.00 points)" in text and "(missed)" in text
    miconi = [_row(v, k, a, model="miconi2021") for v, vals in
              {"plain": (60, 58, 55), "triangle-pruning": (58, 62, 63)}.items() for k, a in zip((1, 2, 3), vals)]
    text = "\n".join(report._miconi_targets(miconi))
    assert "63.00 (missed by 0.50 points)" in text and "58.00 / 62.00 / 63.00 (met)" in text and "60.00 / 58.00 / 55.00 (met)" in text


def test_every_recorded_file_has_the_schema_and_cifar_numbers_say_jpeg():
    for path in sorted(report.RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        assert set(record) >= KEYS, path
        for row in record["rows"]:
            assert set(row) >= ROW_KEYS and isinstance(row["layer"], int), (path, row)
    text = report.render()
    for line in text.splitlines():
        if line.startswith("| ") and "(JPEG copy)" not in line and "cifar" in line.lower():
            pytest.fail(f"a CIFAR-10 row without the JPEG note: {line}")


def test_results_page_is_generated_from_the_files():
    assert report.DOC.read_text() == report.render(), "docs/results.md is stale or hand-edited: run python benchmarks/render_docs.py"


def test_a_row_note_is_listed_once_under_its_table():
    record = {"experiment": "x", "paper": "p", "data": "CIFAR-10", "hardware": {}, "command": "c", "config": {},
              "rows": [{**_row("plain", layer, 60.0, model="miconi2021"), "note": "resumed"} for layer in (1, 2, 3)]}
    page = report.section(record)
    assert page.count("- plain, seed 0: resumed") == 1
    assert page.index("| plain | 3 |") < page.index("Notes on the runs:")


def test_the_authors_code_control_is_set_beside_our_miconi_rows_and_has_no_targets_of_its_own():
    ours = {"experiment": "miconi2021-cifar10", "paper": "p", "data": "CIFAR-10", "hardware": {}, "command": "c", "config": {},
            "rows": [_row("triangle-pruning", k, a, model="miconi2021") for k, a in zip((1, 2, 3), (57.0, 61.5, 61.25))]}
    his = {"experiment": "miconi2021-authors-cifar10", "paper": "p", "data": "CIFAR-10", "hardware": {}, "command": "c",
           "config": {}, "rows": [_row("authors-code", k, a, model="miconi2021") for k, a in zip((1, 2, 3), (58.0, 62.0, 62.0))]}
    page = report.section(ours, his["rows"])
    assert ("layers 1 / 2 / 3 his 58.00 / 62.00 / 62.00, ours (triangle + pruning) 57.00 / 61.50 / 61.25; "
            "at layer 3 ours is -0.75 points from his") in page
    assert "his code on this copy: layer 3 >= 63.5 %: 62.00 (missed by 1.50 points); rises with depth: missed" in page
    control = report.section(his, his["rows"])
    assert "| authors-code | 3 | paper | 62.00 (JPEG copy) |" in control and "Targets" not in control
    assert "the authors' code: test %" in control and "ours: test %" in page
    assert "author's own code" not in report.section(ours)  # no control recorded: no comparison line
    rising = [_row("authors-code", k, a, model="miconi2021") for k, a in zip((1, 2, 3), (58.0, 62.0, 64.0))]
    assert "layer 3 >= 63.5 %: 64.00 (met); rises with depth: met" in report.section(ours, rising)


def test_a_control_section_follows_the_experiment_it_controls(tmp_path, monkeypatch):
    header = {"paper": "p", "data": "CIFAR-10", "hardware": {}, "command": "c", "config": {}}
    for name, variant in (("miconi2021-authors-cifar10", "authors-code"), ("miconi2021-cifar10", "triangle-pruning"),
                          ("softhebb-cifar10", "depth3")):
        rows = [_row(variant, 3, 60.0, model=name.split("-")[0])]
        (tmp_path / f"{name}.json").write_text(json.dumps({"experiment": name, **header, "rows": rows}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    page = report.render()
    order = [page.index(f"## {n}\n") for n in ("miconi2021-cifar10", "miconi2021-authors-cifar10", "softhebb-cifar10")]
    assert order == sorted(order)


def test_rows_recorded_on_another_machine_carry_it_and_the_page_names_each_machine(tmp_path):
    cpu = {"cpu": "EPYC", "cores": 2, "torch_threads": 2, "gpu": None, "torch": "2.14"}
    gpu = {**cpu, "cores": 16, "gpu": "NVIDIA H200", "torch": "2.11"}
    header = {"paper": "p", "data": "CIFAR-10", "command": "c", "config": {}}
    ledger.Experiment("x", {**header, "hardware": cpu}, folder=tmp_path).record([_row("depth3", 3, 70.0)])
    ledger.Experiment("x", {**header, "hardware": gpu}, folder=tmp_path).record([_row("depth3", 3, 71.0, seed=1)])
    saved = json.loads((tmp_path / "x.json").read_text())
    assert saved["hardware"] == cpu and [r["hardware"]["gpu"] for r in saved["rows"]] == [None, "NVIDIA H200"]
    text = report.section(saved)
    assert ("Hardware: 2 CPU cores (EPYC), 2 torch thread(s), torch 2.14 (depth3 seed 0); "
            "GPU NVIDIA H200, 2 torch thread(s), torch 2.11 (depth3 seed 1).") in text
    one = {**saved, "rows": saved["rows"][:1]}
    assert "Hardware: 2 CPU cores (EPYC), 2 torch thread(s), torch 2.14." in report.section(one)


def test_the_scripts_pass_their_device_to_every_phase(tmp_path, monkeypatch):
    import miconi2021
    calls = []
    monkeypatch.setattr(ledger, "train", lambda folder, args, log, threads: calls.append(list(args)) or {"seconds": 1.0})
    monkeypatch.setattr(ledger, "hebbloss", lambda args, log, threads: calls.append(list(args)) or 2.0)
    monkeypatch.setattr(ledger, "results_of", lambda folder: {})
    monkeypatch.setattr(ledger, "probe_rows", lambda results: [
        {"layer": n, "test_acc": 0.5, "train_acc": 0.6, "dim": 4} for n in miconi2021.READ.values()])
    args = type("A", (), {"work": tmp_path, "data_dir": tmp_path, "epochs": 20, "limit": None, "threads": 1,
                          "device": "cuda:1"})()
    rows = miconi2021.run(args, "plain", 0)
    train, probe = calls
    assert train[train.index("--device") + 1] == "cuda:1" and probe[probe.index("--device") + 1] == "cuda:1"
    assert len(rows) == 3 and "--device cuda:1" in rows[0]["command"]


def test_runs_of_one_variant_and_seed_on_several_machines_are_named_by_layer(tmp_path):
    """Backprop baselines of depth 1 and depth 2, seed 0, ran on two machines: the hardware line says
    which layer's run ran where; a variant and seed on one machine keeps the short label."""
    amd = {"cpu": "EPYC", "cores": 2, "torch_threads": 1, "gpu": None, "torch": "2.14"}
    xeon = {**amd, "cpu": "Xeon"}
    header = {"paper": "p", "data": "CIFAR-10", "command": "c", "config": {}}
    ledger.Experiment("x", {**header, "hardware": amd}, folder=tmp_path).record(
        [_row("backprop", 1, 68.0), _row("random", 1, 59.0), _row("random", 2, 61.0)])
    ledger.Experiment("x", {**header, "hardware": xeon}, folder=tmp_path).record([_row("backprop", 2, 73.0)])
    text = report.section(json.loads((tmp_path / "x.json").read_text()))
    assert ("Hardware: 2 CPU cores (EPYC), 1 torch thread(s), torch 2.14 (backprop layer 1 seed 0, random seed 0); "
            "2 CPU cores (Xeon), 1 torch thread(s), torch 2.14 (backprop layer 2 seed 0).") in text
