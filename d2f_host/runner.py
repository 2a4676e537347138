"""Run a workflow headlessly through the host's own machinery: ``execution.validate_prompt`` (the
checks the server runs on ``POST /prompt``) and ``execution.PromptExecutor`` (the worker that runs
queued prompts), with ``comfy.utils.ProgressBar`` hooked as ``main.py`` hooks it. Outputs land where
ComfyUI puts them (its output directory, or the one given).

In a torch.distributed world of several processes (``d2f run --nproc-per-node``, torchrun) every rank runs
the prompt: rank 0 all of it, the other ranks only what the pack's distributed nodes need (``rank_outputs``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch.distributed as dist
from tqdm import tqdm

from . import workflow as wf
from .host import Host, boot, object_info


# The pack's nodes that share their work among the ranks of a multi-process run: every rank executes them, in
# the same order, or their collectives do not meet.
DISTRIBUTED_NODES = frozenset({"D2FTrain", "D2FReflowPairs"})


@dataclass
class RunResult:
    prompt_id: str
    success: bool
    outputs: dict  # node id → the UI output the node reported (images, text, …)
    files: list[str]  # files written under the output directory during the run
    seconds: float
    error: dict | None = None  # the executor's execution_error message
    messages: list = field(default_factory=list)  # (event, data) as the websocket would carry them

    def events(self, name: str) -> list:
        return [data for event, data in self.messages if event == name]


def format_validation_error(result, prompt: dict) -> str:
    _, error, _, node_errors = result
    lines = [f"{error.get('message', 'invalid prompt')}" + (f": {error['details']}" if error.get("details") else "")]
    for node_id, info in (node_errors or {}).items():
        title = (prompt.get(node_id, {}).get("_meta") or {}).get("title", "")
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}{', ' + repr(title) if title else ''}): "
                         f"{e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


def _fmt_seconds(s) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class TextProgress:
    """The executor's messages as text on stderr: one line per node as it starts, a tqdm bar for nodes
    that report progress (redrawn in place on a terminal, every few seconds into a log), and for
    D2FTrain the loss, speed and ETA the node itself reports (it knows about resumed steps; tqdm does not)."""

    def __init__(self, prompt: dict, stream=None):
        self.prompt = prompt
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = len(prompt)
        self.done = 0
        self.current = None
        self.bar = None
        self.train = {}

    def _title(self, node_id) -> str:
        entry = self.prompt.get(str(node_id), {})
        return f"{(entry.get('_meta') or {}).get('title') or entry.get('class_type', '?')} (#{node_id})"

    def _write(self, text: str):
        tqdm.write(text, file=self.stream)  # above the open bar, if any

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, event, data):
        if not isinstance(event, str) or not isinstance(data, dict):
            return  # binary previews
        if event == "execution_cached":
            self.total = len(self.prompt) - len(data.get("nodes", []))
        elif event == "executing":
            node = data.get("node")
            if node is None:
                return
            self._close_bar()
            self.done += 1
            self.current = node
            self._write(f"[{self.done}/{self.total}] {self._title(node)}")
        elif event == "progress":
            self._bar(data.get("node") or self.current, data.get("value", 0), data.get("max", 0))
        elif event == "d2f.train":
            self.train[str(data.get("node"))] = data
            if data.get("kind") == "saved":
                self._write(f"    saved {data.get('path')}")
            elif data.get("kind") == "done":
                self._close_bar()
                self._write(f"    training {data.get('status', 'done')} at step {data.get('step')}/{data.get('total')}")
        elif event == "execution_error":
            self._close_bar()
            self._write(f"error in {self._title(data.get('node_id'))}: {data.get('exception_type')}: "
                        f"{data.get('exception_message')}")
        elif event == "execution_interrupted":
            self._close_bar()
            self._write(f"interrupted in {self._title(data.get('node_id'))}")

    def _bar(self, node, value, total):
        if not total:
            return
        if self.bar is None or self.bar.total != total or value < self.bar.n:
            self._close_bar()
            self.bar = tqdm(total=total, file=self.stream, leave=True, dynamic_ncols=self.tty,
                            mininterval=0.1 if self.tty else 5.0)
        t = self.train.get(str(node))
        if t and t.get("kind") == "progress":
            losses = t.get("losses") or []
            extra = [f"loss {losses[-1]:.4f}"] if losses else []
            if t.get("samples_per_second"):
                extra.append(f"{t['samples_per_second']:.2f} samples/s")
            extra.append(f"ETA {_fmt_seconds(t.get('eta_seconds'))}")
            self.bar.set_postfix_str("  ".join(extra), refresh=False)
        self.bar.update(min(value, total) - self.bar.n)

    def finish(self):
        self._close_bar()


def ancestors(prompt: dict, node_id: str) -> set[str]:
    """The nodes of an API prompt whose outputs ``node_id`` reads, directly or through other nodes."""
    seen, todo = set(), [node_id]
    while todo:
        for value in prompt[todo.pop()]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and value[0] in prompt and value[0] not in seen:
                seen.add(value[0])
                todo.append(value[0])
    return seen


def rank_outputs(prompt: dict, outputs: list[str], rank: int) -> list[str]:
    """The nodes rank ``rank`` of a multi-process run executes (with their ancestors), given the prompt's output
    nodes: rank 0 the outputs, as a single process does; the other ranks the pack's distributed nodes that those
    need, so that files are written and the UI is told once. Raises ``WorkflowError`` when two distributed nodes
    do not depend on one another: the executor could then run them in different orders on different ranks."""
    above = {o: ancestors(prompt, o) for o in outputs}
    needed = set(outputs).union(*above.values())
    shared = sorted(n for n in needed if prompt[n]["class_type"] in DISTRIBUTED_NODES)
    above.update((n, ancestors(prompt, n)) for n in shared)
    for i, a in enumerate(shared):
        for b in shared[i + 1:]:
            if a not in above[b] and b not in above[a]:
                raise wf.WorkflowError(
                    f"nodes {a} ({prompt[a]['class_type']}) and {b} ({prompt[b]['class_type']}) do not depend on one "
                    "another, so the ranks of a multi-process run could execute them in different orders: chain them "
                    "or run them in separate workflows")
    return list(outputs) if rank == 0 else shared


def _snapshot(folder: str) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            try:
                out[p] = os.stat(p).st_mtime_ns
            except OSError:
                pass
    return out


def _progress_hook(server):
    """``main.hijack_progress``'s hook: ProgressBar updates → progress registry + 'progress' messages."""
    import comfy.model_management
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id or server.last_prompt_id
        node_id = node_id or server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                         server.client_id)
    return hook


def run_prompt(prompt: dict, host: Host | None = None, progress=None, client_id: str = "d2f-run") -> RunResult:
    """Validate and execute an API-format prompt (in a world of several processes, this rank's part of it:
    ``rank_outputs``). Raises ``WorkflowError`` when the host's validation rejects it; an execution error is
    returned (``success`` False, ``error`` set)."""
    import comfy.utils
    import execution
    import folder_paths

    host = host or boot()
    server = host.server
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise wf.WorkflowError(format_validation_error(valid, prompt))
    outputs = valid[2]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        outputs = rank_outputs(prompt, outputs, dist.get_rank())

    messages = []

    def listener(event, data):
        messages.append((event, data))
        if progress is not None:
            progress(event, data)

    out_dir = folder_paths.get_output_directory()
    before = _snapshot(out_dir)
    old_listener = getattr(server, "listener", None)
    old_hook = comfy.utils.PROGRESS_BAR_HOOK
    if hasattr(server, "listener"):
        server.listener = listener
    server.last_prompt_id = prompt_id
    comfy.utils.set_progress_bar_global_hook(_progress_hook(server))
    executor = host.executor()
    t0 = time.perf_counter()
    try:
        executor.execute(prompt, prompt_id, {"client_id": client_id}, outputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        if hasattr(server, "listener"):
            server.listener = old_listener
        if hasattr(progress, "finish"):
            progress.finish()
    seconds = time.perf_counter() - t0
    after = _snapshot(out_dir)
    files = sorted(p for p, m in after.items() if before.get(p) != m)
    error = next((data for event, data in executor.status_messages if event == "execution_error"), None)
    if error is None:
        error = next((data for event, data in executor.status_messages if event == "execution_interrupted"), None)
    outputs = (getattr(executor, "history_result", None) or {}).get("outputs", {})
    return RunResult(prompt_id, bool(executor.success) and error is None, outputs, files, seconds, error, messages)


def prepare(workflow, overrides=(), defs: dict | None = None) -> dict:
    """The API prompt for a workflow (path, UI-format dict or API-format dict), overrides applied."""
    data = wf.load(workflow) if isinstance(workflow, (str, os.PathLike)) else workflow
    defs = defs if defs is not None else object_info()
    return wf.apply_overrides(wf.to_api(data, defs), list(overrides), defs)


def run_workflow(workflow, overrides=(), host: Host | None = None, progress=None) -> RunResult:
    host = host or boot()
    return run_prompt(prepare(workflow, overrides), host=host, progress=progress)
