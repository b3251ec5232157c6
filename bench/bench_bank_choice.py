"""How the default bank and classifier were chosen: mean mIoU over the tuning cases of bench/cases.py (and,
apart, the report cases) for variants of the `multiscale` bank's differences of Gaussians, of the
classifier and of its smallest leaf, each over several forest seeds, in one process.

- Bank variants are channel selections of one computation of the bank: every difference of Gaussians is
  `gaussian_sA - gaussian_sB` of the bank's own Gaussians (exactly what the bank subtracts), so "all 21
  pairs" (the bank until 2026-11-30), "from the 2 finest scales" (the bank now), "neighbouring scales"
  and "none" need no other filter code.
- Our classifier: `segment`'s default (extremely randomised trees, 200, depth 10, balanced, 30 % of the
  channels per split), with the leaf size under test (bank and classifier variants use FOREST_MIN_LEAF,
  5 pixels, on every case: `segment` shrinks it only for a class of under 100 labelled pixels, the
  small-particles and demo cases here). Classifier variants on the bank's own channels: the Weka-like
  random forest (`--classifier random_forest`) and extra trees drawing other fractions of the channels.
- ilastik's forest: VIGRA's RandomForest with 100 trees (ilastik 1.4's default classifier, its trees
  split over threads), trained on the same pixels, where Debian's python3-vigra is installed (./dev test
  installs it); else that column is left out with one line. On ISB-3 it gives what real ilastik gives
  (0.644 on its own 37 features, 0.646 on `multiscale`, against 0.643 and 0.644-0.650 in real ilastik).

Usage: python bench/bench_bank_choice.py [--seeds 5] [--cases NAME ...] [--quick | --full] [--save]
Quick: ISB-3 and EM slice 10, one seed (1 minute). Full: every case, 5 seeds (about 35 minutes on 2 cores; 21 with --seeds 3).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import cases
import numpy as np
import peers
import torch
from dinofeat_client.metrics import mean_iou
from dinofeat_server.engine.multiscale_bank import MULTISCALE_SIGMAS, dog_pairs, multiscale_channel_names, multiscale_features
from dinofeat_server.segment.classifiers import DEFAULT_CLASSIFIER, FOREST_MIN_LEAF, make_classifier
from machine import parse_args, save

SYSTEM_PYTHON = "/usr/bin/python3"
VIGRA_FOREST = """
import sys, numpy as np, vigra
X, y, seeds = np.load(sys.argv[1]), np.load(sys.argv[2]), int(sys.argv[4])
m = y > 0
values = np.unique(y[m])
for seed in range(seeds):
    forest = vigra.learning.RandomForest(treeCount=100)
    forest.learnRF(X[m], np.searchsorted(values, y[m]).astype(np.uint32)[:, None], randomSeed=seed + 1)
    np.save(f"{sys.argv[3]}{seed}.npy", values[forest.predictProbabilities(X).argmax(1)])
"""
LEAVES = (1, 2, 3, 5, 10)
DRAWN = ("sqrt", 0.2, 0.5, 1.0)
"""Fractions of the channels extra trees draw per split, beside the default's 0.3 (its "leaves of 5" row)."""


def dog_variants(sigmas: tuple[float, ...] = MULTISCALE_SIGMAS) -> dict[str, list[tuple[float, float]]]:
    """Named sets of (A, B) scale pairs, A < B, of differences of Gaussians."""
    def scales(pairs: list[tuple[int, int]]) -> list[tuple[float, float]]:
        return [(sigmas[i], sigmas[j]) for i, j in pairs]

    return {
        "all 21 pairs": scales(dog_pairs(len(sigmas), finest=len(sigmas))),
        "from the 2 finest scales": scales(dog_pairs(len(sigmas))),  # the bank's own
        "neighbouring scales": list(zip(sigmas, sigmas[1:])),
        "none": [],
    }


def variant_stack(bank: dict[str, np.ndarray], dogs: list[tuple[float, float]]) -> np.ndarray:
    """(pixels, channels): the bank's per-scale channels and the differences of Gaussians `dogs`."""
    per_scale = [v for name, v in bank.items() if not name.startswith("dog_")]
    differences = [bank[f"gaussian_s{a:g}"] - bank[f"gaussian_s{b:g}"] for a, b in dogs]
    return np.stack([c.ravel() for c in per_scale + differences], axis=1)


def our_forest(x: np.ndarray, scribbles: np.ndarray, truth: np.ndarray, seeds: int, leaf: int,
               kind: str = DEFAULT_CLASSIFIER, drawn: float | str | None = None) -> list[float]:
    """mIoU of `kind` (extra trees drawing `drawn` of the channels per split, if given) for each seed."""
    labelled = scribbles.ravel() > 0
    scores = []
    for seed in range(seeds):
        forest = make_classifier(kind, seed=seed, threads=peers.THREADS, leaf=leaf)
        if drawn is not None:
            forest.set_params(max_features=drawn)
        forest.fit(x[labelled], scribbles.ravel()[labelled])
        scores.append(mean_iou(forest.predict(x).reshape(truth.shape), truth))
    return scores


def vigra_available() -> str | None:
    """None when ilastik's forest can run here, else why not."""
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", "import vigra"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{SYSTEM_PYTHON} cannot run ({error})"
    return None if done.returncode == 0 else f"{SYSTEM_PYTHON} has no vigra (Debian's python3-vigra)"


def ilastik_forest(x: np.ndarray, scribbles: np.ndarray, truth: np.ndarray, seeds: int, work: Path) -> list[float]:
    np.save(work / "x.npy", x.astype(np.float32))
    np.save(work / "y.npy", scribbles.ravel())
    subprocess.run([SYSTEM_PYTHON, "-c", VIGRA_FOREST, str(work / "x.npy"), str(work / "y.npy"), str(work / "p"), str(seeds)],
                   check=True, capture_output=True, env=peers.tool_env())
    return [mean_iou(np.load(work / f"p{seed}.npy").reshape(truth.shape), truth) for seed in range(seeds)]


def mean_over(rows: dict, split: str, column: str) -> float | None:
    values = [np.mean(row[column]) for row in rows.values() if row["split"] == split and column in row]
    return float(np.mean(values)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [*cases.TUNING, *cases.REPORT]
    parser.add_argument("--seeds", type=int, default=5, help="forest seeds per variant and case")
    parser.add_argument("--cases", nargs="+", default=names, choices=names, metavar="CASE", help=f"default all: {', '.join(names)}")
    args = parse_args(parser, quick={"cases": ["isb_three_phase", "em_slice10"], "seeds": 1})
    torch.set_num_threads(peers.THREADS)
    without_vigra = vigra_available()
    if without_vigra:
        print(f"ilastik's forest left out: {without_vigra}")
    began, rows = time.perf_counter(), {}
    channel_names = multiscale_channel_names()
    with tempfile.TemporaryDirectory(prefix="bench_bank_choice.") as folder:
        for name in args.cases:
            case = (cases.TUNING.get(name) or cases.REPORT[name])()
            with torch.inference_mode():
                stack = multiscale_features(torch.from_numpy(case.image.astype(np.float32) / 255)[None, None])[0, 0].numpy()
            bank = dict(zip(channel_names, stack))
            row: dict = {"split": "tuning" if name in cases.TUNING else "report"}
            for variant, dogs in dog_variants().items():
                x = variant_stack(bank, dogs)
                row[f"ours: {variant}"] = our_forest(x, case.scribbles, case.truth, args.seeds, FOREST_MIN_LEAF)
                if not without_vigra:
                    row[f"ilastik's forest: {variant}"] = ilastik_forest(x, case.scribbles, case.truth, args.seeds, Path(folder))
            x = variant_stack(bank, dog_variants()["from the 2 finest scales"])
            for leaf in LEAVES:
                row[f"ours: leaves of {leaf}"] = our_forest(x, case.scribbles, case.truth, args.seeds, leaf)
            row["random forest (Weka-like)"] = our_forest(x, case.scribbles, case.truth, args.seeds, FOREST_MIN_LEAF, "random_forest")
            for drawn in DRAWN:
                row[f"extra trees drawing {drawn}"] = our_forest(x, case.scribbles, case.truth, args.seeds, FOREST_MIN_LEAF, drawn=drawn)
            rows[name] = row
            print(f"{name} ({row['split']}): " + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in row.items() if k != "split"), flush=True)
    columns = [k for k in next(iter(rows.values())) if k != "split"]
    means = {c: {split: mean_over(rows, split, c) for split in ("tuning", "report")} for c in columns}
    print()
    print(f"Mean mIoU over the cases, {args.seeds} seed(s) each (tuning cases choose; report cases are shown apart)")
    print(peers.markdown(["variant", "tuning", "report"],
                         [[c, *(f"{means[c][s]:.4f}" if means[c][s] is not None else "-" for s in ("tuning", "report"))]
                          for c in columns]))
    elapsed = time.perf_counter() - began
    print(f"took {elapsed:.0f} s")
    save("bank_choice", {"seeds": args.seeds, "threads": peers.THREADS, "cases": rows, "mean_miou": means,
                         "ilastik_forest": without_vigra or "VIGRA RandomForest, 100 trees", "elapsed_s": elapsed})


if __name__ == "__main__":
    main()
