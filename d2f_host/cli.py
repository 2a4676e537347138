"""``d2f run WORKFLOW.json``: execute a ComfyUI workflow headlessly, in this process.

The workflow may be UI format (as the frontend saves it, e.g. the pack's ``workflows/*.json``) or
API format ("Export (API)"). ComfyUI is found via --comfyui, $COMFYUI_PATH, ~/ComfyUI or the ComfyUI
that contains this pack; it is booted without its web server (all built-in nodes, the installed
custom nodes, this pack), the prompt is checked by the host's own validation and run by its own
executor. Outputs are written where ComfyUI writes them: its output directory, or --output.

ComfyUI must run under a Python that has its packages (psutil, aiohttp, …), which the venv that
``pip install .`` made for ``d2f demo`` lacks. So when this Python cannot import the host's
requirements, ``d2f run`` re-executes itself under the host's Python (--python, else the host's
``.venv/`` or ``venv/``), loading this copy of d2f_core / d2f_app / d2f_host there by file location (putting this
venv's site-packages on that Python's path would mix two torch installs); without such a Python it
stops with one line saying what to do.

``--nproc-per-node N`` trains on N processes of this machine: torch.distributed's elastic launcher (what
``torchrun --standalone`` runs) starts N ranks, each running this command line, and stops them all when one
fails. Every rank boots the host in-process and executes the graph, rank 0 all of it, the others only what the
pack's distributed nodes need (``runner.rank_outputs``). Several machines: ``torchrun --nnodes … --rdzv-endpoint …
-m d2f_host run WORKFLOW.json`` on each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys

# Set in the re-executed process: a second re-execution would loop.
REEXEC_ENV = "D2F_RUN_REEXEC"
# Set by torch's elastic agent (torchrun) in every process it starts: this process is a rank, not the launcher.
WORKER_ENV = "TORCHELASTIC_RUN_ID"

# Run by the host's Python: load d2f_core, d2f_app and d2f_host from their files (argv 1-3), then `d2f <argv 4…>`.
_BOOTSTRAP = """
import importlib.util, os, sys
for name, path in zip(("d2f_core", "d2f_app", "d2f_host"), sys.argv[1:4]):
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    sys.modules[name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
from d2f_app.cli import main
sys.exit(main(sys.argv[4:]))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", help="workflow JSON (UI format as saved by ComfyUI, or API format)")
    p.add_argument("--comfyui", metavar="PATH", default=None,
                   help="ComfyUI checkout to run in (default: $COMFYUI_PATH, else ~/ComfyUI, else the ComfyUI "
                        "whose custom_nodes/ holds this pack)")
    p.add_argument("--python", metavar="PYTHON", default=None,
                   help="the Python that runs ComfyUI (default: this one if it has ComfyUI's packages, else the "
                        "ComfyUI checkout's .venv/ or venv/)")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="output directory (default: ComfyUI's own output/ folder)")
    p.add_argument("--input", metavar="DIR", default=None,
                   help="input directory for LoadImage and dataset folders (default: ComfyUI's input/)")
    p.add_argument("--set", metavar="NODE.input=VALUE", action="append", default=[], dest="overrides",
                   help="override a widget before running; NODE is a node id, type or title, VALUE is JSON or "
                        "text (repeatable), e.g. --set KSampler.steps=8 --set 'EmptyLatentImage.width=768'")
    p.add_argument("--extra-model-paths", metavar="YAML", action="append", default=[],
                   help="extra_model_paths.yaml-style file with more model folders (repeatable)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--nproc-per-node", metavar="N", type=int, default=1,
                   help="run on N processes of this machine (one per GPU; on the CPU they talk through gloo), "
                        "started by torch.distributed's elastic launcher: training nodes share each batch, rank 0 "
                        "alone writes the outputs. D2FTrain's batch_size is per process. Inside a torchrun worker "
                        "torchrun's world is used instead")
    p.add_argument("--no-custom-nodes", action="store_true",
                   help="load only ComfyUI's own nodes and this pack, not the other custom nodes installed")
    p.add_argument("--dry-run", action="store_true",
                   help="convert and validate only: print the API-format prompt and exit")
    p.add_argument("--quiet", action="store_true", help="no progress display, only the result")


def ensure_host_python(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Return if this Python is the one to boot the host in; else re-execute ``d2f <argv>`` under the
    host's Python, or exit with a one-line message (exit status 2)."""
    from .host import _booted_path, find_comfyui, host_python, missing_modules

    if _booted_path() is not None:
        return  # a host already runs in this process (a test session): nothing to check
    try:
        comfyui, _ = find_comfyui(args.comfyui)
    except FileNotFoundError as exc:
        parser.exit(2, f"d2f run: {exc}. To make one (the version tested): git clone --branch v0.33.0 "
                       "https://github.com/comfyanonymous/ComfyUI ~/ComfyUI && cd ~/ComfyUI && python3 -m venv .venv "
                       "&& .venv/bin/pip install -r requirements.txt\n")
    if args.python and not os.access(args.python, os.X_OK):
        parser.exit(2, f"d2f run: --python {args.python} is not an executable file\n")
    missing = missing_modules(comfyui)
    this = os.path.abspath(sys.executable)
    if os.environ.get(REEXEC_ENV) or (not missing and (not args.python or os.path.abspath(args.python) == this)):
        if missing:  # already re-executed, or asked for this Python: the one to fix is this one
            requirements = os.path.join(comfyui, "requirements.txt")
            parser.exit(2, f"d2f run: {sys.executable} cannot import ComfyUI's packages ({_names(missing)}); "
                           f"install them ({sys.executable} -m pip install -r {requirements}) "
                           "or pass --python with the Python that runs ComfyUI\n")
        return
    python = args.python or host_python(comfyui)
    if python is None:
        parser.exit(2, f"d2f run: this Python ({sys.executable}) cannot import ComfyUI's packages ({_names(missing)}) "
                       f"and {comfyui} has no .venv/ or venv/: pass --python with the Python that runs ComfyUI\n")
    if missing:
        print(f"d2f run: this Python lacks ComfyUI's packages ({_names(missing)}); running under {python}",
              file=sys.stderr)
    cmd = [python, "-c", _BOOTSTRAP, *_package_dirs(), *argv]
    env = {**os.environ, REEXEC_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(python, cmd, env)
    sys.exit(subprocess.call(cmd, env=env))


def _package_dirs() -> list[str]:
    """The folders of d2f_core, d2f_app and d2f_host, as ``_BOOTSTRAP`` takes them."""
    import d2f_app
    import d2f_core

    return [os.path.dirname(os.path.abspath(m.__file__)) for m in (d2f_core, d2f_app, sys.modules[__package__])]


def launch(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """``d2f run`` on ``--nproc-per-node`` local ranks through torch.distributed's elastic launcher, as
    ``torchrun --standalone`` starts them; each rank runs this command line under this Python. When a rank fails
    the launcher stops the others; the command then exits 1 naming the ranks that failed."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config = torchrun.parse_args(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "--no-python",
                                  sys.executable, "-c", _BOOTSTRAP, *_package_dirs(), *args.argv])
    try:
        torchrun.run(config)
    except ChildFailedError as exc:
        # The agent ends the ranks still running with SIGTERM and lists them too: those are not what failed.
        stopped = sorted(r for r, f in exc.failures.items() if f.exitcode == -signal.SIGTERM)
        failed = sorted(set(exc.failures) - set(stopped)) or stopped
        ranks = ", ".join(f"rank {r} ({_how_it_ended(exc.failures[r])})" for r in failed)
        parser.exit(1, f"d2f run: {ranks} failed; the launcher stopped the other ranks\n")
    return 0


def _how_it_ended(failure) -> str:
    return f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"


def _shown(path: str) -> str:
    """A path under the current directory relative to it (as the user typed --output), else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


def _names(modules: list[str]) -> str:
    return ", ".join(modules[:6]) + (", ..." if len(modules) > 6 else "")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from . import workflow as wf
    from .host import boot
    from .runner import TextProgress, format_validation_error, prepare, run_prompt

    ensure_host_python(args, parser, args.argv)
    try:
        data = wf.load(args.workflow)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"d2f run: cannot read {args.workflow}: {exc}\n")
    import torch.distributed as dist
    from d2f_core.training.distributed import DistributedContext

    launcher = args.nproc_per_node > 1 and not args.dry_run and WORKER_ENV not in os.environ
    # A torchrun rank joins its group before the host boots: a CUDA rank binds its own card first (ComfyUI
    # takes the current one), and a launch that cannot meet fails before minutes of loading.
    rank = 0 if launcher else DistributedContext.from_environment(device="cpu" if args.cpu else None).rank
    quiet = args.quiet or rank > 0  # rank 0 speaks for the run
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    if launcher:
        return launch(args, parser)
    try:
        host = boot(args.comfyui, cpu=args.cpu or None, output_dir=args.output, input_dir=args.input,
                    extra_model_paths=args.extra_model_paths, custom_nodes=not args.no_custom_nodes)
    except (FileNotFoundError, RuntimeError) as exc:
        parser.exit(2, f"d2f run: {exc}\n")
    try:
        prompt = prepare(data, args.overrides)
    except wf.WorkflowError as exc:
        parser.exit(2, f"d2f run: {args.workflow}: {exc}\n")

    if args.dry_run:
        import asyncio

        import execution

        valid = asyncio.run(execution.validate_prompt("dry-run", prompt, None))
        json.dump(prompt, sys.stdout, indent=2)
        sys.stdout.write("\n")
        if not valid[0]:
            parser.exit(1, "d2f run: the host rejects this prompt:\n" + format_validation_error(valid, prompt) + "\n")
        return 0

    progress = None if quiet else TextProgress(prompt)
    try:
        result = run_prompt(prompt, host=host, progress=progress)
    except wf.WorkflowError as exc:
        parser.exit(1, f"d2f run: the host rejects this prompt:\n{exc}\n")
    if not result.success:
        err = result.error or {}
        where = f" on rank {rank}" if dist.is_initialized() else ""
        parser.exit(1, f"d2f run: failed{where} in node {err.get('node_id')} ({err.get('node_type')}): "
                       f"{err.get('exception_type', '')}: {err.get('exception_message', 'interrupted')}\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank > 0:
        return 0
    print(f"d2f run: done in {result.seconds:.1f} s")
    for path in result.files:
        print(f"  wrote {_shown(path)}")
    return 0
