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
    assert "d2f_core" in tops
    assert "d2f_core/assets/digits.npz" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "d2f = d2f_core.cli:main" in text


def test_engine_never_imports_the_host():
    offenders = []
    for path in (ROOT / "d2f_core").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import comfy", "from comfy", "import nodes", "from nodes", "import folder_paths")):
                offenders.append(f"{path.name}: {stripped}")
    assert not offenders, offenders
