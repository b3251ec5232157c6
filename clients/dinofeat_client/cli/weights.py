"""`dinofeat weights random BACKBONE -o FILE.pth`: a seeded random checkpoint of a named DINOv2 backbone in the official
layout, so every deep command can be tried offline (`--weights FILE.pth`); its features carry no meaning."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.outputs import atomic_result

from ..server_part import write_random_checkpoint
from .progress import ProgressBars


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
