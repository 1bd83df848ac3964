"""Command line of the job system: `python -m training.jobs reconcile [--every N] [--lost-after S]`.

`python -m training reconcile` is the same command: it delegates here.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from training.settings import Settings

RECONCILE_HELP = ("requeue training jobs whose worker died; re-send lost messages and dataset ingests; kill runs "
                  "that ignore a cancel")

out = Console(soft_wrap=True)


def add_reconcile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the reconcile command's flags to `parser`."""
    parser.add_argument("--every", type=float, help="repeat every N seconds (default: once)")
    parser.add_argument("--lost-after", type=float, default=600.0, metavar="SECONDS",
                        help="re-send a queued job's or dataset's message once it is this old (default: 600)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommand."""
    parser = argparse.ArgumentParser(prog="python -m training.jobs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_reconcile_arguments(sub.add_parser("reconcile", help=RECONCILE_HELP))
    return parser


def command_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Run the job reconciler once, or every N seconds until interrupted."""
    # Imported here: `python -m training` loads this module for every command, and only this one needs Celery.
    from training.jobs.reconciler import reconcile_every

    reconcile_every(settings, args.every, args.lost_after, lambda counts: out.print_json(json.dumps(counts)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return command_reconcile(args, Settings.from_env())
    except ValueError as exc:  # a setting in the environment that is not valid
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
