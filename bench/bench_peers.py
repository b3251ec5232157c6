"""dinofeat's features inside the peer programs, against each program's own features: mIoU against the
ground truth and wall time inside Trainable Weka Segmentation (Fiji) and inside ilastik, on ISB-3 and the EM
slices 10-15 (training on each case's scribbles, predicting the same image).

- TWS own: TWS's default features and forest (seed 1), tests/jvm/tws_own_features.py in a JVM of its own.
- TWS ours: `dinofeat fiji train IMAGE --labels SCRIBBLES --set SET -o model --fiji FIJI --seed 1`, then
  `dinofeat fiji apply` (time: both). FIJI: $FIJI_DIR, else ../shared/vendor/fiji/Fiji.app.tar.gz unpacked
  once into ~/.cache/dinofeat-fiji (as ./dev does for the tests); both TWS columns are skipped without it.
- ilastik own: headless ilastik 1.4.3 with all 37 of its features, as in bench_pixel_classification.py
  (time: the headless run; its forest is not seeded).
- ilastik ours: `dinofeat ilastik IMAGE -o proj --labels SCRIBBLES --set SET`, `dinofeat ilastik --batch proj
  COPY.tif`, then the headless command it prints (time: all three).
A set the CLI refuses (not there yet) fills the "ours" columns with the CLI's one-sentence message.

Thread budget: every process runs with 2 threads (OMP_NUM_THREADS=2, MKL/OpenBLAS/BLIS/numexpr/vecLib
counts, LOKY_MAX_CPU_COUNT=2, LAZYFLOW_THREADS=2 for ilastik, JAVA_TOOL_OPTIONS=-XX:ActiveProcessorCount=2
for the JVMs), and each process is pinned to 2 cores where the machine has more (see peers.py). Times are
process wall times (start-up included), the median of --repeats runs, the tools alternating within each
repeat (TWS runs once, see below); mIoU is the mean over the repeats. ilastik does not seed its forest, so its mIoU moves from run to run
(by 0.003-0.007 on these cases): its cells give mean ± standard deviation, and one repeat is not enough to
compare them (the default is 3). TWS is seeded (the same mIoU every run), so it runs once and its time is
that run's.

Usage: python bench/bench_peers.py [--set multiscale] [--repeats 3] [--cases NAME ...] [--quick | --full] [--save]
Quick: ISB-3 only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cases
import peers
from dinofeat_client.metrics import mean_iou
from machine import parse_args, save

CASES = ["isb_three_phase", *(f"em_slice{n}" for n in range(10, 16))]


def split_of(name: str) -> str:
    return "tuning" if name in cases.TUNING else "report"


def loader(name: str):
    return cases.TUNING.get(name) or cases.REPORT[name]


def columns(feature_set: str) -> list[peers.Column]:
    return [
        peers.Column("TWS own", lambda i, work: peers.tws_own(i.image_file, i.scribbles_file, work)),
        peers.Column("TWS ours", lambda i, work: peers.tws_ours(i.image_file, i.scribbles_file, feature_set, work), feature_set),
        peers.Column("ilastik own", lambda i, work: peers.ilastik_own(i.image, i.scribbles, work), seeded=False),
        peers.Column("ilastik ours", lambda i, work: peers.ilastik_ours(i.image_file, i.scribbles_file, feature_set, work), feature_set,
                     seeded=False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="multiscale", help="dinofeat feature set of the 'ours' columns")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool per case; times are the median")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES, metavar="CASE", help=f"default: {', '.join(CASES)}")
    args = parse_args(parser, quick={"cases": ["isb_three_phase"], "repeats": 1})
    began = time.perf_counter()
    chosen = [(name, split_of(name), loader(name)) for name in CASES if name in args.cases]
    tools = columns(args.set)
    with tempfile.TemporaryDirectory(prefix="bench_peers.") as folder:
        rows = peers.measure(tools, chosen, args.repeats, Path(folder), mean_iou, only_unseeded_repeat=True)
    names = [c.name for c in tools]
    print()
    print(f"Inside the peers: their own features against dinofeat's `{args.set}`, {args.repeats} repeat(s), "
          f"{peers.THREADS} threads per tool; mIoU and median wall time per case")
    lines = [[case, row["split"], *(peers.miou_text(row["tools"][n]) for n in names), *(peers.time_text(row["tools"][n]) for n in names)]
             for case, row in rows.items()]
    means = {n: peers.mean_miou(rows, n) for n in names}
    lines.append(["mean", "", *(f"{means[n]:.3f}" if means[n] is not None else "-" for n in names), *("" for _ in names)])
    print(peers.markdown(["case", "split", *names, *(f"time {n}" for n in names)], lines))
    for line in peers.notes(rows):
        print(line)
    elapsed = time.perf_counter() - began
    print(f"took {elapsed:.0f} s")
    save("peers", {"threads": peers.THREADS, "repeats": args.repeats, "set": args.set, "tws_seed": peers.TWS_SEED,
                   "ilastik_features": peers.ALL_FEATURES, "cases": rows, "mean_miou": means, "notes": peers.notes(rows),
                   "elapsed_s": elapsed})


if __name__ == "__main__":
    main()
