"""What `pip install .` puts in site-packages: the engine and the `d2f` command, never a top-level
`nodes` package (it would shadow ComfyUI's own `nodes` module)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}")
    wheel = next(tmp_path.glob("diff2flow_bridge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert "nodes" not in tops and "__init__.py" not in tops
    assert {"d2f_core", "d2f_app", "d2f_host"} <= tops
    assert {f"d2f_core/{room}/__init__.py" for room in ("flow", "training", "storage")} <= set(names)
    assert "d2f_app/assets/digits.npz" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "d2f = d2f_app.cli:main" in text


def test_engine_never_imports_the_host():
    offenders = []
    for path in (ROOT / "d2f_core").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import comfy", "from comfy", "import nodes", "from nodes", "import folder_paths")):
                offenders.append(f"{path.name}: {stripped}")
    assert not offenders, offenders


def _imports(path: Path) -> set[str]:
    """Absolute names a module imports (relative imports resolved against its package)."""
    import ast
    package = ".".join(path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


@pytest.mark.parametrize("room, forbidden", [
    ("d2f_core", ("comfy", "comfy_api", "folder_paths", "nodes", "d2f_app", "d2f_host")),
    ("d2f_core/flow", ("d2f_core.training", "d2f_core.storage")),
    ("d2f_core/storage", ("d2f_core.flow", "d2f_core.training")),
])
def test_the_rooms_import_only_what_their_docstrings_allow(room, forbidden):
    """The layout is the architecture: the engine imports neither ComfyUI nor the application; the math imports
    no training; storage imports no other room."""
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in (ROOT / room).rglob("*.py")
                 for name in sorted(_imports(path)) if name.split(".")[0] in forbidden or name.startswith(forbidden)]
    assert not offenders, offenders
