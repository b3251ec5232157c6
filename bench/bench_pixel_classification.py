"""Pixel classification from scribbles, end to end: mIoU against the ground truth and wall time of
`dinofeat segment` (one column per feature set), a scikit-image script and real headless ilastik with its
own features, each run as a process as a user runs it, on every labelled case of bench/cases.py (TUNING and
REPORT, tagged tuning/report).

- dinofeat: `dinofeat segment IMAGE --labels SCRIBBLES --set SET -o OUT.tif --seed 0` (embedded server,
  device auto, the default classifier: extremely randomised trees), for each SET in --sets. A set the CLI refuses (not there yet) fills its column with the
  CLI's one-sentence message; the benchmark goes on.
- scikit-image: a script (written into the temporary folder) that reads the TIFFs, computes
  multiscale_basic_features(intensity, edges, texture, sigma 1..16: 20 channels), trains
  RandomForestClassifier(200 trees, max_depth 10, balanced, n_jobs=-1, random_state 0) on the labelled
  pixels, predicts every pixel and writes the class map.
- ilastik: headless ilastik 1.4.3 (../shared/tools/ilastik/install.sh; the column is skipped with the
  script's last stderr line where it cannot be installed), a Pixel Classification project on the raw image
  with all 37 of ilastik's features and the scribbles as labels, trained at the start of a headless run on
  the same image; the argmax of the exported probabilities is the class map. Its forest is not seeded.
  The time is the headless run's.

Thread budget: every process runs with 2 threads (OMP_NUM_THREADS=2, MKL/OpenBLAS/BLIS/numexpr/vecLib
counts, LOKY_MAX_CPU_COUNT=2 for scikit-learn's n_jobs=-1, LAZYFLOW_THREADS=2 for ilastik), and each
process is pinned to 2 cores where the machine has more (see peers.py).
Times are process wall times (start-up included), the median of --repeats runs; within each repeat the
tools alternate (dinofeat sets, scikit-image, ilastik, then again). mIoU is the median over the repeats.

Usage: python bench/bench_pixel_classification.py [--sets multiscale ilastik classical] [--repeats 3]
       [--cases NAME ...] [--quick | --full] [--save]
Quick: cases isb_three_phase and em_slice10, one repeat.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cases
import peers
from dinofeat_client.metrics import mean_iou
from machine import parse_args, save

SKIMAGE_SCRIPT = '''"""scikit-image's multiscale features + a scikit-learn forest, trained on the scribbles.
usage: python skimage_segment.py IMAGE.tif SCRIBBLES.tif CLASSES.tif"""
import json
import sys
import time

import numpy as np
import tifffile
from skimage.feature import multiscale_basic_features
from sklearn.ensemble import RandomForestClassifier

start = time.perf_counter()
image, scribbles = tifffile.imread(sys.argv[1]), tifffile.imread(sys.argv[2])
features = multiscale_basic_features(image, intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16)
labelled = scribbles > 0
forest = RandomForestClassifier(n_estimators=200, max_depth=10, class_weight="balanced", n_jobs=-1, random_state=0)
forest.fit(features[labelled], scribbles[labelled])
classes = forest.predict(features.reshape(-1, features.shape[-1])).reshape(scribbles.shape)
tifffile.imwrite(sys.argv[3], classes.astype(scribbles.dtype))
print(json.dumps({"from_inputs_s": time.perf_counter() - start, "channels": features.shape[-1]}))
'''

QUICK_CASES = ["isb_three_phase", "em_slice10"]


def skimage_column(script: Path) -> peers.Column:
    def run(inputs: peers.Inputs, work: Path) -> peers.Outcome:
        out = peers.fresh(work, "skimage") / "classes.tif"
        seconds, done = peers.run([peers.sys.executable, str(script), str(inputs.image_file), str(inputs.scribbles_file), str(out)],
                                  work, "the scikit-image script")
        inside = json.loads(peers.last_line(done.stdout))
        return peers.Outcome(peers.tifffile.imread(out), seconds, {"from_inputs_s": inside["from_inputs_s"]})

    return peers.Column("skimage", run)


def dinofeat_column(feature_set: str) -> peers.Column:
    return peers.Column(f"dinofeat {feature_set}",
                        lambda inputs, work: peers.dinofeat_segment(inputs.image_file, inputs.scribbles_file, feature_set, work),
                        feature_set)


def ilastik_column() -> peers.Column:
    return peers.Column("ilastik", lambda inputs, work: peers.ilastik_own(inputs.image, inputs.scribbles, work), seeded=False)


def all_cases() -> list[tuple[str, str, object]]:
    return [*((n, "tuning", f) for n, f in cases.TUNING.items()), *((n, "report", f) for n, f in cases.REPORT.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["multiscale", "ilastik", "classical"], help="dinofeat feature sets, one column each")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool per case; times are the median")
    names = [name for name, _, _ in all_cases()]
    parser.add_argument("--cases", nargs="+", default=names, choices=names, metavar="CASE",
                        help=f"cases to run (default all: {', '.join(names)})")
    args = parse_args(parser, quick={"cases": QUICK_CASES, "repeats": 1})
    chosen = [c for c in all_cases() if c[0] in args.cases]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_pixel_classification.") as folder:
        work = Path(folder)
        script = work / "skimage_segment.py"
        script.write_text(SKIMAGE_SCRIPT)
        columns = [*(dinofeat_column(s) for s in args.sets), skimage_column(script), ilastik_column()]
        rows = peers.measure(columns, chosen, args.repeats, work, mean_iou)
    names = [c.name for c in columns]
    print()
    print(f"Pixel classification, {args.repeats} repeat(s), {peers.THREADS} threads per tool; mIoU and median wall time per process")
    print(peers.markdown(["case", "split", *(f"mIoU {n}" for n in names), *(f"time {n}" for n in names)],
                         [[case, row["split"], *(peers.miou_text(row["tools"][n]) for n in names),
                           *(peers.time_text(row["tools"][n]) for n in names)] for case, row in rows.items()]))
    means = {n: {split: peers.mean_miou(rows, n, split) for split in ("tuning", "report")} for n in names}
    print()
    for split in ("tuning", "report"):
        print(f"mean mIoU over {split} cases: " + ", ".join(
            f"{n} {means[n][split]:.3f}" if means[n][split] is not None else f"{n} -" for n in names))
    ratios = {}
    for n in names[: len(args.sets)]:
        both = [r["tools"] for r in rows.values() if "seconds" in r["tools"][n] and "seconds" in r["tools"]["skimage"]]
        if both:
            ratios[n] = sum(t[n]["seconds"] for t in both) / sum(t["skimage"]["seconds"] for t in both)
    print("time ratio to the scikit-image script (total over the cases both ran): "
          + (", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()) or "none (no case where both ran)"))
    for line in peers.notes(rows):
        print(line)
    elapsed = time.perf_counter() - began
    print(f"took {elapsed:.0f} s")
    save("pixel_classification", {"threads": peers.THREADS, "repeats": args.repeats, "sets": args.sets,
                                  "ilastik_features": peers.ALL_FEATURES, "cases": rows, "mean_miou": means,
                                  "time_ratio_over_skimage": ratios, "notes": peers.notes(rows), "elapsed_s": elapsed})


if __name__ == "__main__":
    main()
