"""The ``d2f`` command line (console script ``d2f = d2f_app.cli:main``).

Subcommands:
  demo   train two tiny ε / v UNets on the bundled digits on CPU, show that native DDIM and the
         zero-shot flow Euler sampler give the same samples, fine-tune them (Diff2Flow, + scheduled
         sampling, + Reflow) and print a few-step quality table.

  run    execute a ComfyUI workflow JSON headlessly in a ComfyUI install (``d2f_host.cli``).

Each subcommand is an ``(add_arguments, handler(args, parser), help)`` entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys


def _add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p.add_argument("--steps-train", type=int, default=None,
                   help=f"optimizer steps per model (default {d.steps_train}; --quick: {DemoConfig.quick().steps_train})")
    p.add_argument("--size", type=int, default=d.size,
                   help=f"image side in pixels; the 8x8 digits are resized to SIZE x SIZE (default {d.size}, "
                        "a multiple of 4; cost grows with SIZE^2)")
    p.add_argument("--out", default="d2f-demo-out", help="output folder for grid.png and results.json "
                                                         "(default ./d2f-demo-out/)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for init, data, noise and split (default {d.seed})")
    p.add_argument("--samples", type=int, default=None,
                   help=f"samples per table cell, also the FD sample size (default {d.n_samples})")
    p.add_argument("--sample-steps", default=None,
                   help="comma-separated step counts for the tables (default "
                        f"{','.join(map(str, d.sample_steps))})")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default {d.threads}, --quick: {DemoConfig.quick().threads}; 0 = torch's choice)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds): for tests, not for judging quality")
    size.add_argument("--full", action="store_true",
                      help=f"a longer run: {DemoConfig.full().steps_train} native steps, "
                           f"{DemoConfig.full().finetune_steps} fine-tune steps, {DemoConfig.full().reflow_pairs} "
                           f"Reflow pairs, {DemoConfig.full().n_samples} samples per cell (tens of minutes on 2 cores)")
    p.add_argument("--no-finetune", action="store_true",
                   help="skip the fine-tuned rows (Diff2Flow fine-tune, + scheduled sampling, + Reflow)")


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from .demo import DemoConfig, run_demo

    overrides = {"size": args.size, "seed": args.seed}
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.steps_train is not None:
        overrides["steps_train"] = args.steps_train
    if args.no_finetune:
        overrides["finetune"] = False
    if args.samples is not None:
        overrides["n_samples"] = args.samples
    if args.sample_steps:
        try:
            overrides["sample_steps"] = tuple(int(s) for s in args.sample_steps.split(",") if s.strip())
        except ValueError:
            parser.error(f"--sample-steps wants comma-separated integers, got '{args.sample_steps}'")
    make = DemoConfig.quick if args.quick else DemoConfig.full if args.full else DemoConfig
    cfg = make(**overrides)
    try:
        cfg.validate()
    except ValueError as e:  # a bad flag is a usage error (exit 2), not a traceback
        parser.error(str(e))
    return run_demo(cfg, out=args.out)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    try:  # d2f_host drives a ComfyUI install; it imports ComfyUI only when a workflow runs
        from d2f_host.cli import add_arguments
    except ImportError:
        p.add_argument("workflow")
        return
    add_arguments(p)


def _run_workflow(args: argparse.Namespace, parser: argparse.ArgumentParser):
    try:
        from d2f_host.cli import run
    except ImportError as exc:
        parser.exit(2, f"d2f run needs the d2f_host package (installed with this pack): {exc}\n")
    return run(args, parser)


COMMANDS = {
    "demo": (_add_demo_arguments, _run_demo,
             "train tiny ε/v UNets on the bundled digits (CPU, a few minutes), compare DDIM with the flow bridge "
             "and with Diff2Flow / scheduled-sampling / Reflow fine-tunes"),
    "run": (_add_run_arguments, _run_workflow,
            "execute a ComfyUI workflow JSON headlessly against a ComfyUI install (--comfyui, $COMFYUI_PATH, ~/ComfyUI)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2f", description="Diff2Flow Bridge: discrete VP diffusion read as flow matching.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_subparser=p)
    return parser


def main(argv=None) -> int:
    """Entry point; returns the process exit status (results go to stdout and the --out folder)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # `d2f run` re-executes itself with them under the host's Python
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _, handler, _ = COMMANDS[args.command]
    handler(args, args._subparser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
