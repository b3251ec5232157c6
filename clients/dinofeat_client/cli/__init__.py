"""The `dinofeat` command line: its parser and main. Without --server a command uses this user's local server (or an
embedded one). Each command module adds its commands, their arguments beside their bodies (`add_parsers`); the
options several commands share are built once in options.py."""

from __future__ import annotations

import argparse
import os
import sys

from dinofeat import __version__
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import io_failure, is_write_error, tidy_on_failure

from . import features, peers, segmentation, servers, weights
from .options import NAMESPACE_DEFAULTS, SharedOptions
from .progress import ProgressBars, progress_seconds


def build_parser() -> argparse.ArgumentParser:
    """`dinofeat` and its commands, in the order `dinofeat --help` lists them."""
    parser = argparse.ArgumentParser(prog="dinofeat", description="DINOv2 and classical feature stacks for Fiji, ilastik and Python.")
    parser.add_argument("--version", action="version", version=f"dinofeat {__version__}")
    parser.set_defaults(**NAMESPACE_DEFAULTS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = SharedOptions.build()
    for module in (servers, features, peers, segmentation, weights):
        module.add_parsers(commands, shared)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `dinofeat ARGV`; its exit status. Run as the program (no `argv`: the `dinofeat` command, `python -m
    dinofeat_client.cli`), the process ends as soon as the command has finished (see end_process)."""
    args = build_parser().parse_args(argv)
    bars = ProgressBars(enabled=not args.quiet, terminal=sys.stderr.isatty(),
                        every_s=progress_seconds())
    status = run_command(args, bars)
    bars.close()
    if argv is None or args.ends_at_once:
        end_process(status)
    return status


def end_process(status: int) -> None:
    """End the process now with `status`, without the interpreter's teardown. Every command has written and
    closed its outputs (and stopped its embedded server) when it returns; what is left is freeing module by
    module what torch and scikit-learn loaded, about 0.5-1 s on a small CPU. Commands that start Java (Fiji)
    need it too: TWS's idle worker threads would keep a normal exit waiting, or abort it while Java shuts down."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(args: argparse.Namespace, bars: ProgressBars) -> int:
    """Run the chosen command; its exit status (1 with one sentence for bad input or a failed read or write, 130
    when interrupted). Folders the command created for its outputs are removed again if it fails and they are empty."""
    try:
        with tidy_on_failure():
            args.run(args, bars)
    except DinofeatError as error:
        bars.close()
        print(f"dinofeat: error: {error}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as error:  # a write no write site caught (e.g. in a project's small files): one sentence
        if not is_write_error(error):
            raise
        bars.close()
        print(f"dinofeat: error: {io_failure(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bars.close()
        print("dinofeat: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0

