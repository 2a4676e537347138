"""Loading the pack the way ComfyUI does, on hosts that cannot run it: the failure is loud and says why.

Each case runs in a fresh interpreter that imports the pack folder as a package under a path-derived
name (as ``nodes.load_custom_node`` does: ``spec_from_file_location(name, <pack>/__init__.py)``), with a
meta-path hook that makes chosen modules unimportable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

import comfy_host

PACK_DIR = comfy_host.PACK_DIR

LOADER = r'''
import importlib.abc, importlib.util, logging, sys
pack, blocked, host = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
if host:
    sys.path.insert(0, host)

class Block(importlib.abc.MetaPathFinder):
    """Makes the modules in ``blocked`` (and their submodules) unimportable, like a host that lacks them."""
    def find_spec(self, name, path=None, target=None):
        for b in blocked:
            if b and (name == b or name.startswith(b + ".")):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(name)s: %(message)s")
name = pack.replace(".", "_x_")  # ComfyUI's module name for a custom-node folder
spec = importlib.util.spec_from_file_location(name, pack + "/__init__.py", submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
try:
    spec.loader.exec_module(module)
except Exception as exc:
    print(f"RAISED {type(exc).__name__} {type(exc).__mro__[1].__name__}: {exc}")
else:
    print("LOADED", hasattr(module, "comfy_entrypoint"))
'''


def load(blocked: list[str], host: str = "") -> str:
    proc = subprocess.run([sys.executable, "-c", LOADER, PACK_DIR, ",".join(blocked), host],
                          capture_output=True, text=True, timeout=240, cwd=PACK_DIR)
    return proc.stdout + proc.stderr


def minimum_version() -> str:
    source = open(os.path.join(PACK_DIR, "__init__.py"), encoding="utf-8").read()
    return re.search(r'^MINIMUM_COMFYUI = "([0-9.]+)"', source, re.M).group(1)


def test_minimum_version_is_declared_once_for_the_registry_too():
    with open(os.path.join(PACK_DIR, "pyproject.toml"), "rb") as f:
        comfy = tomllib.load(f)["tool"]["comfy"]
    assert comfy["requires-comfyui"] == ">=0.25.0" == f">={minimum_version()}"


def _old_host(root: str) -> str:
    """A stand-in ComfyUI older than the V3 API: its core ``comfy`` package and ``folder_paths``, no ``comfy_api``."""
    os.makedirs(os.path.join(root, "comfy"))
    open(os.path.join(root, "comfy", "__init__.py"), "w").close()
    open(os.path.join(root, "folder_paths.py"), "w").close()
    return root


def test_no_v3_api_is_a_loud_error_naming_the_minimum_version(tmp_path):
    """A ComfyUI without ``comfy_api`` (older than v0.3.48): logged at ERROR and raised (ComfyUI then lists
    the pack under 'IMPORT FAILED' with this message), never an empty pack."""
    out = load(["comfy_api"], _old_host(str(tmp_path)))
    assert "RAISED HostTooOldError ImportError" in out, out
    assert f"needs ComfyUI v{minimum_version()} or newer" in out
    assert re.search(rf"LOG ERROR .*needs ComfyUI v{re.escape(minimum_version())} or newer", out), out
    assert "LOADED" not in out


def test_host_without_comfy_api_latest_is_a_loud_error(host_location):
    """The real host with only ``comfy_api.latest`` made unimportable (its older API versions still there)."""
    if not host_location:
        pytest.skip(host_location.how)
    out = load(["comfy_api.latest"], host_location.path)
    assert "RAISED HostTooOldError ImportError" in out, out
    assert f"ComfyUI v{minimum_version()} or newer" in out and "has no V3 node API" in out
    assert re.search(r"LOG ERROR .*needs ComfyUI", out), out


@pytest.mark.parametrize("blocked", ["comfy_kitchen", "safetensors"])
def test_other_import_errors_are_not_swallowed(blocked):
    """A missing dependency is reported as itself, not as an old host and not silently: the old loader
    swallowed every ImportError whose message mentioned "comfy" (e.g. comfy_kitchen, a host dependency)."""
    out = _load_with_failing_api(blocked)
    assert f"RAISED ModuleNotFoundError ImportError: No module named '{blocked}'" in out, out
    assert "HostTooOldError" not in out and "LOADED" not in out


def _load_with_failing_api(missing: str) -> str:
    """A stand-in host whose ``comfy_api.latest`` exists but fails importing ``missing``."""
    import tempfile

    with tempfile.TemporaryDirectory() as host:
        _old_host(host)
        os.makedirs(os.path.join(host, "comfy_api", "latest"))
        with open(os.path.join(host, "comfy_api", "latest", "__init__.py"), "w") as f:
            f.write(f"import {missing}\n")
        return load([missing], host)


def test_a_package_import_with_no_comfyui_anywhere_is_quiet():
    """Imported as a package where no ComfyUI exists at all (pytest collecting a checkout whose folder name is
    an identifier): nothing to report on, no error, no log."""
    out = load(["comfy", "folder_paths", "comfy_api"])
    assert "LOADED False" in out and "RAISED" not in out and "LOG ERROR" not in out, out


def test_importing_the_file_without_a_package_is_quiet():
    """pytest collection from a checkout whose folder name is not an identifier imports the file as the
    top-level module ``__init__`` (no package): no nodes, no error and no log, with or without a host."""
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('__init__', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print('OK', m.WEB_DIRECTORY)")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(PACK_DIR, "__init__.py")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK ./web" and not proc.stderr, proc.stderr
