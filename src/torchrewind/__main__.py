"""Command line: ``python -m torchrewind <command>`` (or the ``torchrewind`` console script)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo import DEFAULT_LR, DEFAULT_STEPS, QUICK_STEPS

    parser = argparse.ArgumentParser(
        prog="torchrewind",
        description="torchrewind: exact, fast undo/redo of a whole PyTorch training state.",
    )
    parser.add_argument("--version", action="version", version=f"torchrewind {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train an MLP on scikit-learn's digits at a too-high lr, with and without undoing bad steps",
        description=(
            "Train a small MLP on scikit-learn's bundled digits data twice, with Adam at a too-high learning rate "
            "and the same weights and batches: plainly, and with torchrewind undoing every step that made the "
            "mini-batch loss worse and retrying it at half the lr. Prints a table and saves a PNG of the loss "
            "curves (needs matplotlib: pip install 'torchrewind[demo]')."
        ),
    )
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help=f"optimizer steps per run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)")
    demo.add_argument("--lr", type=_positive_float, default=DEFAULT_LR,
                      help=f"Adam's initial learning rate (default {DEFAULT_LR:g}: too high on purpose)")
    demo.add_argument("--seed", type=int, default=0, help="seed for weights, batch order and split (default 0)")
    demo.add_argument("--out", default="torchrewind-demo.png", help="where to save the plot (default %(default)s)")
    demo.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    demo.add_argument("--quick", action="store_true", help=f"tiny run ({QUICK_STEPS} steps), for tests")
    demo.set_defaults(handler=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import demo_main

    try:
        return demo_main(steps=args.steps, lr=args.lr, seed=args.seed, out=args.out, no_plot=args.no_plot,
                         quick=args.quick)  # fmt: skip
    except ImportError as e:  # scikit-learn missing
        print(f"torchrewind demo: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (argparse's own exits, e.g. ``--help``, are returned too)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
