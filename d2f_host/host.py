"""Find a ComfyUI checkout and boot it in this process, the way its ``main.py`` does without the web
server: arguments, folder paths (incl. ``extra_model_paths.yaml``), every built-in node, the
installed custom nodes (this pack among them), and a stand-in for ``PromptServer.instance`` that
passes the executor's messages to a listener instead of a websocket.

If a ComfyUI is already booted in this process (a test session's host), it is reused as it is:
only missing built-in node files and this pack are loaded on top.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import logging
import os
import re
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def is_comfyui(path: str | None) -> bool:
    return bool(path) and all(os.path.isfile(os.path.join(path, f))
                              for f in ("main.py", "nodes.py", "execution.py", "folder_paths.py"))


def _is_pack(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, f)) for f in ("__init__.py", "nodes", "d2f_core"))


def pack_dir() -> str | None:
    """The node pack this package ships with (its repository / ``custom_nodes`` folder); when this
    package was ``pip install``-ed from a clone, that clone if it is the current directory (README's
    commands run there); else None."""
    for candidate in (os.path.dirname(PACKAGE_DIR), os.getcwd()):
        if _is_pack(candidate):
            return candidate
    return None


def find_comfyui(explicit: str | None = None) -> tuple[str, str]:
    """(path, how it was found): ``explicit`` (--comfyui), ``$COMFYUI_PATH``, ``~/ComfyUI``, else the
    ComfyUI whose ``custom_nodes/`` holds this pack. Raises FileNotFoundError saying what was tried."""
    tried = []
    for how, candidate in (("--comfyui", explicit), ("$COMFYUI_PATH", os.environ.get("COMFYUI_PATH"))):
        if candidate:
            path = os.path.abspath(os.path.expanduser(candidate))
            if is_comfyui(path):
                return path, how
            # an explicit choice that is wrong is an error, not a reason to pick another host
            raise FileNotFoundError(f"{how}={candidate} is not a ComfyUI checkout (no main.py, nodes.py, "
                                    "execution.py, folder_paths.py there)")
    home = os.path.expanduser("~/ComfyUI")
    if is_comfyui(home):
        return home, "~/ComfyUI"
    tried.append(home)
    pack = pack_dir()
    for p in filter(None, dict.fromkeys((pack, pack and os.path.realpath(pack)))):
        parent = os.path.dirname(p)
        if os.path.basename(parent) == "custom_nodes" and is_comfyui(os.path.dirname(parent)):
            return os.path.dirname(parent), f"the ComfyUI containing this pack ({p})"
        tried.append(f"the ComfyUI containing {p}")
    raise FileNotFoundError("no ComfyUI found (tried --comfyui, $COMFYUI_PATH, " + ", ".join(tried) +
                            "); pass --comfyui PATH or set COMFYUI_PATH")


def host_python(comfyui: str) -> str | None:
    """The Python of the host's own venv (``.venv/`` or ``venv/`` inside the checkout, as ComfyUI's
    install guide makes it), or None."""
    for rel in (os.path.join(".venv", "bin", "python"), os.path.join("venv", "bin", "python"),
                os.path.join(".venv", "Scripts", "python.exe"), os.path.join("venv", "Scripts", "python.exe")):
        p = os.path.join(comfyui, rel)
        if os.access(p, os.X_OK):
            return p
    return None


# Distributions whose import name is not the distribution name lower-cased with '-' → '_'.
_IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml", "opencv-python": "cv2", "pyopengl": "OpenGL"}
_CORE_MODULES = ("torch", "numpy", "safetensors", "aiohttp", "yaml", "PIL", "psutil")


def host_modules(comfyui: str) -> list[str]:
    """The modules of the host's essential requirements (``requirements.txt`` up to its "non essential"
    line), i.e. what this Python must be able to import to boot that ComfyUI."""
    try:
        with open(os.path.join(comfyui, "requirements.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return list(_CORE_MODULES)
    modules = []
    for line in lines:
        if line.strip().lower().startswith("#non essential"):
            break
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9_.-]*)", line)
        if m:
            name = m.group(1).lower()
            modules.append(_IMPORT_NAMES.get(name, name.replace("-", "_").replace(".", "_")))
    return modules


def missing_modules(comfyui: str) -> list[str]:
    """The host's required modules this Python cannot import (looked up, not imported: cheap)."""
    return [m for m in host_modules(comfyui) if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return False


# ---------------------------------------------------------------------------------------------
# the PromptServer stand-in
# ---------------------------------------------------------------------------------------------
class _NoopRegistry:
    def register(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None


class HeadlessServer:
    """What the executor, ``comfy.utils.ProgressBar``'s hook and nodes use of ``PromptServer.instance``:
    ``send_sync``, ``send_progress_text``, ``client_id``, ``last_node_id``/``last_prompt_id``,
    ``sockets_metadata``, ``routes`` (custom nodes add HTTP routes at import) and
    ``node_replace_manager``. Messages go to ``listener(event, data)``."""

    def __init__(self):
        from aiohttp import web

        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.routes = web.RouteTableDef()
        self.node_replace_manager = _NoopRegistry()
        self.listener = None
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None):
        if self.listener is not None:
            self.listener(event, data)

    async def send(self, event, data, sid=None):
        self.send_sync(event, data, sid)

    def send_progress_text(self, text, node_id, sid=None):
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8", "replace")
        self.send_sync("progress_text", {"node": node_id, "text": text}, sid)

    def queue_updated(self):
        pass


class Host:
    """A booted ComfyUI: its modules, the stand-in server, the node definitions."""

    def __init__(self, path: str, how: str, server):
        import execution
        import folder_paths
        import nodes

        self.path, self.how = path, how
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        self.server = server
        self._executor = None

    def object_info(self) -> dict:
        return object_info()

    def executor(self):
        """One ``PromptExecutor`` for this host, reused across runs as the server's worker reuses its
        own (its output cache keeps what consecutive prompts share: loaded checkpoints, encodings)."""
        if self._executor is None:
            self._executor = self.execution.PromptExecutor(
                self.server, cache_type=self.execution.CacheType.CLASSIC,
                cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        return self._executor


_HOST: Host | None = None


def _booted_path() -> str | None:
    mod = sys.modules.get("nodes")
    f = getattr(mod, "__file__", None) if mod is not None else None
    if f and os.path.basename(f) == "nodes.py" and "comfy.model_management" in sys.modules:
        return os.path.dirname(os.path.realpath(f))
    return None


def _run(coro):
    return asyncio.run(coro)


def _install_server_stub():
    """``PromptServer.instance`` for node code that reaches for it; the real server's, if any, wins."""
    import server as comfy_server

    instance = getattr(comfy_server.PromptServer, "instance", None)
    if instance is None:
        instance = HeadlessServer()
        comfy_server.PromptServer.instance = instance
    return instance


def ensure_builtin_extras() -> list[str]:
    """Load the host's ``comfy_extras/nodes_*.py`` files that are not loaded yet (as
    ``init_builtin_extra_nodes`` does at start-up); returns the ones that failed to import."""
    import nodes

    extras_dir = os.path.join(os.path.dirname(os.path.realpath(nodes.__file__)), "comfy_extras")
    failed = []
    for path in sorted(glob.glob(os.path.join(extras_dir, "nodes_*.py"))):
        if os.path.splitext(path)[0] in sys.modules:  # load_custom_node's module key for files
            continue
        if not _run(nodes.load_custom_node(path, module_parent="comfy_extras")):
            failed.append(os.path.basename(path))
    return failed


def ensure_pack() -> None:
    """This pack's nodes, from ``custom_nodes`` when installed there, else from its own folder."""
    import nodes

    if "D2FFlowPatch" in nodes.NODE_CLASS_MAPPINGS:
        return
    pack = pack_dir()
    if pack is None or not _run(nodes.load_custom_node(pack)):
        raise RuntimeError("the Diff2Flow Bridge nodes are not loaded: install the pack in ComfyUI's custom_nodes/ "
                           f"(tried to load it from {pack or 'nowhere: d2f_host is not inside the pack'})")


def boot(comfyui: str | None = None, *, cpu: bool | None = None, output_dir: str | None = None,
         input_dir: str | None = None, extra_model_paths=(), custom_nodes: bool = True) -> Host:
    """Boot (once) or reuse the in-process ComfyUI. ``cpu=None`` lets ComfyUI pick its device."""
    global _HOST
    booted = _booted_path()
    if booted is not None:
        path, how = booted, "already booted in this process"
        if comfyui and os.path.realpath(comfyui) != booted:
            raise RuntimeError(f"a ComfyUI from {booted} is already booted in this process; cannot boot {comfyui}")
    else:
        path, how = find_comfyui(comfyui)
    if _HOST is None:
        if booted is None:
            _boot_fresh(path, cpu=cpu, custom_nodes=custom_nodes)
        server = _install_server_stub()
        ensure_builtin_extras()
        ensure_pack()
        _HOST = Host(path, how, server)
    import folder_paths
    import utils.extra_config

    for yaml_path in extra_model_paths or ():
        utils.extra_config.load_extra_path_config(os.path.abspath(yaml_path))
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        folder_paths.set_output_directory(os.path.abspath(output_dir))
    if input_dir:
        folder_paths.set_input_directory(os.path.abspath(input_dir))
    return _HOST


def _boot_fresh(path: str, *, cpu: bool | None, custom_nodes: bool) -> None:
    loaded = sys.modules.get("nodes")
    if loaded is not None:
        raise RuntimeError(f"a module named 'nodes' is already imported from {getattr(loaded, '__file__', loaded)}; "
                           "ComfyUI's own nodes.py must be the one imported")
    while path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401  (device setup, as main.py does early)
    import folder_paths
    import utils.extra_config

    host_yaml = os.path.join(path, "extra_model_paths.yaml")
    if os.path.isfile(host_yaml):
        utils.extra_config.load_extra_path_config(host_yaml)
    _install_server_stub()  # before the nodes: some register routes or replacements at import
    import nodes

    logging.info(f"d2f: booting ComfyUI from {path}")
    _run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
    del folder_paths


def object_info() -> dict:
    """``/object_info`` of the booted host: every node's definition as the server sends it."""
    import nodes
    from comfy_api.internal import _ComfyNodeInternal

    out = {}
    for name, cls in list(nodes.NODE_CLASS_MAPPINGS.items()):
        try:
            out[name] = node_info(name, cls, nodes, _ComfyNodeInternal)
        except Exception as exc:  # one broken node must not hide the others (the server skips it too)
            logging.warning(f"d2f: cannot describe node {name}: {exc}")
    return out


def node_info(name, cls, nodes, v3_base) -> dict:
    """The server's ``node_info`` (server.py, ``/object_info``) for one node class."""
    if isinstance(cls, type) and issubclass(cls, v3_base):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    info = {"input": types, "input_order": {k: list(v.keys()) for k, v in types.items()},
            "is_input_list": getattr(cls, "INPUT_IS_LIST", False), "output": cls.RETURN_TYPES,
            "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
            "name": name, "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
            "description": getattr(cls, "DESCRIPTION", ""), "category": getattr(cls, "CATEGORY", "sd"),
            "output_node": getattr(cls, "OUTPUT_NODE", False) is True}
    info["output_name"] = getattr(cls, "RETURN_NAMES", info["output"])
    return info
