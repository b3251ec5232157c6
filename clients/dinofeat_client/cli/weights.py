"""`dinofeat weights random BACKBONE -o FILE.pth`: a seeded random checkpoint of a named DINOv2 backbone in the official
layout, so every deep command can be tried offline (`--weights FILE.pth`); its features carry no meaning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import atomic_result
from dinofeat.contract.computation import DEFAULT_BACKBONE

from ..server_part import write_random_checkpoint
from .progress import ProgressBars
from .options import SharedOptions


def random_weights_warning(path: Path, seed: int) -> str:
    """The sentence every random checkpoint is written with: what it is for, and what it is not for."""
    return (f"dinofeat: WARNING: {path} holds RANDOM weights (seed {seed}), not trained ones: features computed with it "
            "carry NO meaning. Use it to try the deep commands offline (--weights " f"{path}), never for results.")


def command_weights_random(args: argparse.Namespace, bars: ProgressBars) -> None:
    """Write the official architecture of args.backbone with seeded random weights to args.output (.pth), loudly labelled."""
    path = Path(args.output)
    if path.suffix != ".pth":
        raise DinofeatError(f"a checkpoint in the official layout is a .pth file; name the output {path.stem}.pth.")
    parameters = atomic_result(path, lambda temporary: write_random_checkpoint(args.backbone, temporary, args.seed))
    print(f"wrote {path}: {args.backbone} (official architecture and layout), {parameters / 1e6:.1f} M random parameters, "
          f"{path.stat().st_size / 1e6:.0f} MB")
    print(random_weights_warning(path, args.seed), file=sys.stderr)


def add_parsers(commands: argparse._SubParsersAction, shared: SharedOptions) -> None:
    """The weights command: weights random."""
    weights = commands.add_parser("weights",
                                  help="weights files: a random checkpoint of a DINOv2 or DINOv3 backbone for trying deep sets offline")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="random")
    p = weights_commands.add_parser("random", help="write a seeded RANDOM checkpoint of a backbone (official layout): "
                                    "every deep command runs with --weights FILE, but its features carry no meaning",
                                    description="Write the official architecture of BACKBONE with seeded random weights, "
                                    "in the layout of the official .pth files, for trying the deep sets offline "
                                    "(--weights FILE.pth). Its features carry no meaning: never use them for results.")
    p.set_defaults(run=command_weights_random)
    p.add_argument("backbone", metavar="BACKBONE", help=f"an official backbone name (`dinofeat sets` lists them), e.g. {DEFAULT_BACKBONE} "
                   "(about 90 MB; vitb14 350 MB, vitl14 1.2 GB, vitg14 4.5 GB; _reg for 4 registers) or dinov3_vits16 (86 MB)")
    p.add_argument("-o", "--output", required=True, help="the .pth file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same weights (default 0)")
