"""Machine description, run mode and JSON output shared by the benchmarks.

Every benchmark parses its arguments with `parse_args(parser, quick={...})`, which adds three options:
  --quick  small sizes and repeats, so that the whole set takes a few minutes on a 2-core CPU
           (what `./dev bench` passes unless given --full);
  --full   the full sizes behind the published figures (the default when a script runs by itself);
  --save   replace the tracked figures in bench/results/NAME.json (full runs only).
Without --save, `save()` writes to $DINOFEAT_BENCH_RESULTS or bench/results/local/ (ignored by git),
so checking our figures never changes the published ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import NoReturn

RESULTS = Path(__file__).resolve().parent / "results"
"""The tracked, published figures; only `--save` writes here."""
LOCAL = RESULTS / "local"
"""Where a run's results go by default (ignored by git); $DINOFEAT_BENCH_RESULTS overrides it."""

_run = {"quick": False, "save": False}
"""This process's mode, set by parse_args (a script that never calls it runs full and saves locally)."""


def machine_info() -> dict:
    """CPU, thread counts, versions and GPU of this machine, stored with every result."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def described(quick: dict) -> str:
    """The quick defaults as command-line options, for --help: {"sizes": [512]} -> "--sizes 512"."""
    words = []
    for key, value in quick.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        words.append(" ".join([f"--{key.replace('_', '-')}", *map(str, values)]))
    return ", ".join(words)


def parse_args(parser: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """Parse the command line with the common --quick/--full/--save options added.

    With --quick, the defaults in `quick` (argument name -> value) replace the script's full ones;
    options given explicitly still win. The last of --quick/--full counts, so `./dev bench NAME --full`
    (which passes --quick first) runs full."""
    mode = parser.add_argument_group("run mode")
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help=f"small sizes for a check in seconds to a minute ({described(quick)})")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the full sizes behind the published figures (the default when run by itself)")
    mode.add_argument("--save", action="store_true",
                      help="replace the tracked bench/results/NAME.json (full runs only); otherwise results go to "
                           "$DINOFEAT_BENCH_RESULTS or bench/results/local/")
    parser.set_defaults(mode="full")
    if parser.parse_known_args()[0].mode == "quick":
        parser.set_defaults(**quick)
    args = parser.parse_args()
    if args.save and args.mode == "quick":
        parser.error("--save replaces the published figures in bench/results/, which come from full runs: add --full")
    _run.update(quick=args.mode == "quick", save=args.save)
    return args


def quick() -> bool:
    """Whether this run uses the quick sizes (set by parse_args)."""
    return _run["quick"]


def skip(name: str, why: str) -> NoReturn:
    """End a benchmark that cannot run here (no JVM, no reference code...) with one line, status 0,
    so that `./dev bench` goes on with the others."""
    print(f"{name}: skipped: {why}")
    sys.exit(0)


def results_folder() -> Path:
    """bench/results/ with --save; otherwise $DINOFEAT_BENCH_RESULTS or bench/results/local/."""
    if _run["save"]:
        return RESULTS
    return Path(os.environ.get("DINOFEAT_BENCH_RESULTS") or LOCAL)


def save(name: str, results: dict) -> Path:
    """Write {machine, mode, results} to NAME.json in results_folder(), say where, and return the path."""
    path = results_folder() / f"{name}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": machine_info(), "mode": "quick" if quick() else "full",
                                    "results": results}, indent=2))
    except OSError as error:
        sys.exit(f"bench_{name}: cannot write the results to {path}: {error.strerror or error}.")
    note = "" if _run["save"] else " (the published figures in bench/results/ are unchanged; --full --save replaces them)"
    print(f"saved {path}{note}")
    return path
