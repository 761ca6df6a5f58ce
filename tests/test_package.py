"""The package's shape: ``import hebbloss`` stays light (no timm, torchvision or matplotlib), exports what
users need, and no module of hebbloss reaches into another module's private names."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hebbloss

PACKAGE = Path(hebbloss.__file__).resolve().parent


def test_import_hebbloss_imports_neither_timm_nor_torchvision_nor_matplotlib():
    code = ("import sys, hebbloss; heavy = [m for m in ('timm', 'torchvision', 'matplotlib') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "", f"import hebbloss imported {out.stdout.strip()}"


@pytest.mark.parametrize("name", ["attach", "Plasticity", "surrogate_loss", "select_layers", "validate", "ValidationReport",
                                  "Rule", "UnsupportedLayer", "KWTA", "SoftWTA", "Triangle", "ZCA", "post_signal",
                                  "checkpoint", "atomic", "optim", "init", "prune", "zca", "models", "data", "probe",
                                  "feedback", "rules", "layers", "competition"])
def test_exported_names_resolve(name):
    assert name in hebbloss.__all__
    assert getattr(hebbloss, name) is not None


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        hebbloss.nonexistent  # noqa: B018


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``import from`` names, from inside ``module`` (a package's own module
    is called ``package.__init__`` here, so that one level up is the package itself)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    return ".".join(parts[: len(parts) - node.level] + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _violations(path: Path, source=None):
    module = _module_name(path)
    if path.name == "__init__.py":
        module += ".__init__"
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    hebbloss_aliases = set()  # local names bound to a hebbloss module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not source.startswith("hebbloss"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if _is_module(target):
                    hebbloss_aliases.add(alias.asname or alias.name)
                elif _private(alias.name):
                    found.append(f"{path.name}:{node.lineno} imports {source}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hebbloss") and alias.asname:
                    hebbloss_aliases.add(alias.asname)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in hebbloss_aliases and _private(node.attr):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    """Package-private modules (``hebbloss._hooks``, ``_local``, ``_units``) may be imported inside the package;
    a private function, class or attribute of another module may not."""
    found = [v for path in sorted(PACKAGE.rglob("*.py")) for v in _violations(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_check_can_fail():
    source = "from .. import layers, _hooks\nfrom .ridge import _alphas\nx = layers._is_pruned\ny = _hooks.HookOwner\n"
    found = _violations(PACKAGE / "probe" / "evaluate.py", source)
    assert sorted(found) == ["evaluate.py:2 imports hebbloss.probe.ridge._alphas", "evaluate.py:3 uses layers._is_pruned"]
