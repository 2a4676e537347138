"""``d2f run WORKFLOW.json``: execute a ComfyUI workflow headlessly, in this process.

The workflow may be UI format (as the frontend saves it, e.g. the pack's ``workflows/*.json``) or
API format ("Export (API)"). ComfyUI is found via --comfyui, $COMFYUI_PATH, ~/ComfyUI or the ComfyUI
that contains this pack; it is booted without its web server (all built-in nodes, the installed
custom nodes, this pack), the prompt is checked by the host's own validation and run by its own
executor. Outputs are written where ComfyUI writes them: its output directory, or --output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", help="workflow JSON (UI format as saved by ComfyUI, or API format)")
    p.add_argument("--comfyui", metavar="PATH", default=None,
                   help="ComfyUI checkout to run in (default: $COMFYUI_PATH, else ~/ComfyUI, else the ComfyUI "
                        "whose custom_nodes/ holds this pack)")
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
    p.add_argument("--no-custom-nodes", action="store_true",
                   help="load only ComfyUI's own nodes and this pack, not the other custom nodes installed")
    p.add_argument("--dry-run", action="store_true",
                   help="convert and validate only: print the API-format prompt and exit")
    p.add_argument("--quiet", action="store_true", help="no progress display, only the result")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from . import workflow as wf
    from .host import boot
    from .runner import TextProgress, format_validation_error, prepare, run_prompt

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        data = wf.load(args.workflow)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"d2f run: cannot read {args.workflow}: {exc}\n")
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

    progress = None if args.quiet else TextProgress(prompt)
    try:
        result = run_prompt(prompt, host=host, progress=progress)
    except wf.WorkflowError as exc:
        parser.exit(1, f"d2f run: the host rejects this prompt:\n{exc}\n")
    if not result.success:
        err = result.error or {}
        parser.exit(1, f"d2f run: failed in node {err.get('node_id')} ({err.get('node_type')}): "
                       f"{err.get('exception_type', '')}: {err.get('exception_message', 'interrupted')}\n")
    print(f"d2f run: done in {result.seconds:.1f} s")
    for path in result.files:
        print(f"  wrote {path}")
    return 0
