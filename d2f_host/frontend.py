"""A real ComfyUI server and its real frontend in headless Chromium, for tests and for authoring the
example workflows. Needs the ComfyUI checkout (with its venv's ``comfyui_frontend_package``), the
Python ``playwright`` package and a system Chromium (Debian's ``chromium``); never downloads a browser.

The server runs from its own checkout with ``--base-directory`` pointing at a scratch folder whose
``custom_nodes/`` links to this pack, so nothing is written into the user's ComfyUI tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from .host import host_python

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    env = os.environ.get("D2F_CHROMIUM")
    if env and os.access(env, os.X_OK):
        return env
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` on a free loopback port with a scratch base directory; killed on exit."""

    def __init__(self, comfyui: str, base_dir: str, pack_dir: str, port: int | None = None,
                 extra_args=(), startup_timeout: float = 120.0, pack_name: str = "diff2flow_bridge"):
        self.comfyui, self.base_dir, self.pack_dir, self.pack_name = comfyui, base_dir, pack_dir, pack_name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.proc = None
        self.log_path = os.path.join(base_dir, "server.log")

    @property
    def models_dir(self):
        return os.path.join(self.base_dir, "models")

    @property
    def input_dir(self):
        return os.path.join(self.base_dir, "input")

    @property
    def output_dir(self):
        return os.path.join(self.base_dir, "output")

    def prepare(self):
        for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        link = os.path.join(self.base_dir, "custom_nodes", self.pack_name)
        if not os.path.lexists(link):
            os.symlink(os.path.realpath(self.pack_dir), link)
        return self

    def start(self):
        self.prepare()
        cmd = [host_python(self.comfyui) or sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--output-directory", self.output_dir,
               "--input-directory", self.input_dir, "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--preview-method", "none", *self.extra_args]
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def quiet_ui(self):
        """Settings for clean, deterministic pages: no template browser on first load, no minimap."""
        self.set_setting("Comfy.TutorialCompleted", True)
        self.set_setting("Comfy.Minimap.Visible", False)
        return self

    def set_setting(self, key: str, value):
        """A frontend setting for the default user (e.g. ``Comfy.TutorialCompleted``), as the UI stores it."""
        req = urllib.request.Request(self.url + "/settings/" + key, data=json.dumps(value).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def post_json(self, path: str, body, timeout: float = 10.0):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8") or "null")

    def get_json(self, path: str, timeout: float = 10.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def browser(viewport=(1600, 1000), chromium: str | None = None):
    """A Playwright page in headless system Chromium with a fresh user-data dir."""
    from playwright.sync_api import sync_playwright

    exe = chromium or chromium_path()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="d2f_chromium_profile_")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                profile, executable_path=exe, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": viewport[0], "height": viewport[1]})
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.console_log = []
                page.on("console", lambda m: page.console_log.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: page.console_log.append(f"pageerror: {e}"))
                yield page
            finally:
                ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def open_app(page, url: str, timeout_ms: int = 90_000):
    """Load the frontend and wait until the app and its extensions are up."""
    page.goto(url, timeout=timeout_ms)
    page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager && "
                           "window.app.vueAppReady !== false", timeout=timeout_ms)
    page.wait_for_function("() => (window.app.extensions || []).some(e => e.name === 'diff2flow.bridge')",
                           timeout=timeout_ms)


def close_dialogs(page):
    """Close the first-run template browser and any other open dialog."""
    for _ in range(3):
        if page.locator(".p-dialog").count() == 0:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


LOAD_AND_SAVE_JS = """
async ([workflow, name]) => {
  await window.app.loadGraphData(workflow, true, true, name);
  const p = await window.app.graphToPrompt();
  return JSON.stringify({workflow: p.workflow, output: p.output});
}
"""


def load_and_serialize(page, workflow: dict, name: str) -> dict:
    """Load a UI workflow into the frontend and return what it saves (``workflow``) and queues
    (``output``, the API prompt)."""
    return json.loads(page.evaluate(LOAD_AND_SAVE_JS, [workflow, name]))


FRAME_JS = """
([types, margin]) => {
  const c = window.app.canvas, g = window.app.rootGraph || window.app.graph;
  const nodes = g._nodes.filter(n => !types || types.includes(n.type));
  let b = [1e9, 1e9, -1e9, -1e9];
  for (const n of nodes) b = [Math.min(b[0], n.pos[0]), Math.min(b[1], n.pos[1] - 40),
                              Math.max(b[2], n.pos[0] + n.size[0]), Math.max(b[3], n.pos[1] + n.size[1])];
  if (!types) for (const gr of (g._groups || [])) { const r = gr._bounding || gr.bounding;
    if (r) b = [Math.min(b[0], r[0]), Math.min(b[1], r[1]), Math.max(b[2], r[0] + r[2]), Math.max(b[3], r[1] + r[3])]; }
  b = [b[0] - margin, b[1] - margin, b[2] + margin, b[3] + margin];
  const el = c.canvas, vw = el.clientWidth, vh = el.clientHeight, bw = b[2] - b[0], bh = b[3] - b[1];
  const s = Math.min(vw / bw, vh / bh, 1.5) * 0.96;
  c.ds.scale = s;
  c.ds.offset = [(vw / s - bw) / 2 - b[0], (vh / s - bh) / 2 - b[1]];
  c.setDirty(true, true);
}
"""


def frame(page, types=None, margin: int = 20):
    """Zoom and pan the canvas so that the nodes of ``types`` (all nodes and groups if None) fill it."""
    page.evaluate(FRAME_JS, [list(types) if types else None, margin])
    page.wait_for_timeout(300)
