"""The docs site builds with `mkdocs build --strict` (broken links, anchors, nav entries or API
references fail), and the tutorial's code runs as written."""
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    api = (site / "api" / "index.html").read_text()
    for name in ("hebbloss.surrogate_loss", "hebbloss.attach", "hebbloss.checkpoint.save"):
        assert name in api, f"the API page does not document {name}"


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    missing = [p for p in pages if p not in nav]
    assert not missing, f"add these pages to the nav of mkdocs.yml: {missing}"


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_tutorial_code_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HEBBLOSS_CACHE", str(tmp_path / "cache"))
    code = python_blocks(ROOT / "docs" / "tutorial_probe.md")
    assert len(code) >= 3
    namespace = {}
    exec(compile("\n".join(code), "docs/tutorial_probe.md", "exec"), namespace)
    before, after = namespace["before"], namespace["after"]
    for report in (before, after):
        layers = {r.layer for r in report.rows}
        assert layers == {"input", "pool1", "pool2"}
        assert all(0.0 <= r.test_acc <= 1.0 for r in report.rows)
    # 32 pooled conv channels carry far more than the 4 quadrant means of the pixels
    assert after.result("pool2").test_acc > after.result("input").test_acc + 0.3
