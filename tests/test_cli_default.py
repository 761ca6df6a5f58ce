"""The real command in a fresh process: the console-script entry point, and `hebbloss run` with no
dataset or model flags on the embedded offline dataset (a small --limit keeps it quick)."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_points_at_main():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["hebbloss"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0


def test_default_run_on_embedded_dataset(tmp_path):
    env = {**os.environ, "HEBBLOSS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "hebbloss.cli", "run", "--limit", "300", "--epochs", "1", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "pool1" in proc.stdout and "random" in proc.stdout  # the layerwise table is printed
    (folder,) = (tmp_path / "hebbloss-results").iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert results["dataset"]["name"] == "mnist-mini" and results["config"]["model"] == "miconi2021"
    assert {r["network"] for r in results["probe"]["rows"]} == {"model", "random"}
    assert (folder / "accuracy_per_layer.png").is_file() and (folder / "filters.png").is_file()
