"""The `paper` presets against the paper's own code (HR-Dv2) on the same crop: time and peak memory.

Both run the same seeded random ViT-S/14 (official initialisation, float32) in one process, in
alternating order, so the machine's noise hits both alike; the figure that matters is the ratio
(target: median ours/reference <= 1.0, 1.1 at most). Peak memory is measured apart, one fresh process
per implementation and preset (in one process each run would reuse memory the other freed): the
resident memory above the level after loading the model, sampled every 2 ms during one run.
Needs ../shared/vendor/reference (see tests/reference_code.py).
Skipped, with one line, where that code is absent.
Usage: python bench/bench_reference.py [--size 112 140] [--repeats 3] [--presets paper paper_flips]
       [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from dinofeat_server.engine.deep import PRESETS, DeepExtractor
from dinofeat_server.engine.weights import load_backbone
from machine import parse_args, save, skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_code import ReferenceUnavailable, hr_dv2_features, hr_dv2_featuriser, official_model  # noqa: E402


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measured(run) -> tuple[float, float]:
    """(seconds, peak bytes above the start) of one call of `run`."""
    start_rss, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes() - start_rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, max(peak[0], resident_bytes() - start_rss)


def implementations(preset: str, size: tuple[int, int]) -> dict:
    """name -> a call computing `preset` on the same random uint8 crop: ours and HR-Dv2's, same weights."""
    official = official_model("dinov2_vits14", seed=0)
    path = Path(__file__).resolve().parent / "results" / ".bench_reference_vits14.pth"
    path.parent.mkdir(exist_ok=True)
    torch.save(official.state_dict(), path)
    extractor = DeepExtractor(load_backbone(path).eval(), torch.device("cpu"))
    path.unlink()
    spec = PRESETS[preset]
    net = hr_dv2_featuriser("dinov2_vits14", official.state_dict(), flips=spec.flips)
    grey = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    return {"ours": lambda: extractor.features(grey / 255.0, spec), "hr_dv2": lambda: hr_dv2_features(net, grey)}


def peak_in_fresh_process(which: str, preset: str, size: tuple[int, int]) -> float:
    """Peak bytes above the loaded model of one run of `which`, in a new process."""
    command = [sys.executable, __file__, "--peak-of", which, "--presets", preset, "--size", *map(str, size)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", nargs=2, type=int, default=[112, 140], metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["paper", "paper_flips"])
    parser.add_argument("--peak-of", choices=("ours", "hr_dv2"), help=argparse.SUPPRESS)
    args = parse_args(parser, quick={"size": [56, 70], "repeats": 1, "presets": ["paper"]})
    size = tuple(args.size)
    try:
        first = implementations(args.presets[0], size)
    except ReferenceUnavailable as why:
        skip("bench_reference", f"the reference code cannot run here: {why}")
    if args.peak_of:
        print(json.dumps({"peak_bytes": measured(first[args.peak_of])[1]}))
        return
    results = {}
    print(f"{'preset':<12}{'views':>6}{'ours s':>9}{'HR-Dv2 s':>10}{'ratio':>7}{'ours MB':>9}{'HR-Dv2 MB':>11}")
    for name in args.presets:
        runs = first if name == args.presets[0] else implementations(name, size)
        for run in runs.values():
            run()  # warm-up
        times, ratios = {k: [] for k in runs}, []
        for repeat in range(args.repeats):
            for key in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
                times[key].append(measured(runs[key])[0])
            ratios.append(times["ours"][-1] / times["hr_dv2"][-1])
        peaks = {key: peak_in_fresh_process(key, name, size) for key in runs}
        row = {"size": list(size), "views": PRESETS[name].view_count(), "repeats": args.repeats,
               "ours_s": statistics.median(times["ours"]), "hr_dv2_s": statistics.median(times["hr_dv2"]),
               "median_ratio": statistics.median(ratios), "max_ratio": max(ratios),
               "ours_peak_MB": peaks["ours"] / 1e6, "hr_dv2_peak_MB": peaks["hr_dv2"] / 1e6}
        results[name] = row
        print(f"{name:<12}{row['views']:>6}{row['ours_s']:>9.2f}{row['hr_dv2_s']:>10.2f}{row['median_ratio']:>7.2f}"
              f"{row['ours_peak_MB']:>9.0f}{row['hr_dv2_peak_MB']:>11.0f}", flush=True)
    save("reference", results)


if __name__ == "__main__":
    main()
