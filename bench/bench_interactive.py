"""Interactive speed (issue 13, item 3): `dinofeat segment` against the scikit-image script end to end, and
the default bank against scikit-image's features at one thread, on the 512 x 512 ISB three-phase image.

(a) End to end, each run a process as a user runs it: `dinofeat segment IMAGE --labels SCRIBBLES -o OUT.tif
    --seed 0` (default `multiscale` set and classifier) and the scikit-image script of bench_pixel_classification.py
    (reads the TIFFs, multiscale_basic_features sigma 1..16, a 200-tree forest of depth 10, writes the class
    map), alternating, --runs times each, with the same thread budget (2 threads, pinned; see peers.py).
    dinofeat runs two ways: cold (DINOFEAT_LOCAL_SERVER=0: an embedded server in the command's process, which
    imports torch and scikit-learn every time) and warm (the per-user local server, started once by an untimed
    command before the timed runs, in a runtime folder of this benchmark's own, stopped at the end).
    Target: median warm dinofeat time <= median script time. The mIoU of the class maps is printed too (the
    same every run: all are seeded).
(b) The bank alone, in this process, at one thread: `multiscale_features` (53 channels) against
    `multiscale_basic_features(intensity, edges, texture, sigma 1..16)` (20 channels) with its default workers
    (it blurs the 5 scales on a thread pool: 2 threads here) and with workers=1, alternating, --bank-runs
    times each after a warm-up, on the image scaled to [0, 1] as each tool takes it. Target: median bank
    time <= scikit-image's.

Usage: python bench/bench_interactive.py [--runs 5] [--bank-runs 21] [--quick | --full] [--save]
Quick: --runs 3 --bank-runs 7.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cases
import dinofeat_server  # noqa: F401  (before torch: the server's OpenMP and allocator defaults)
import numpy as np
import peers
import tifffile
import torch
from bench_pixel_classification import SKIMAGE_SCRIPT
from dinofeat_client.metrics import mean_iou
from dinofeat_server.engine.multiscale_bank import multiscale_features
from machine import parse_args, save
from skimage.feature import multiscale_basic_features

CASE = "isb_three_phase"


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """os.environ with `values` set (peers.run passes this process's environment on), restored afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def end_to_end(runs: int, work: Path) -> dict:
    """(a): the script and dinofeat cold and warm as processes, alternating; wall times, medians, ratios, mIoU."""
    case = cases.REPORT[CASE]()
    image_file, scribbles_file = cases.DATA / CASE / "image.tif", cases.DATA / CASE / "scribbles.tif"
    script = work / "skimage_segment.py"
    script.write_text(SKIMAGE_SCRIPT)
    cold, warm = {"DINOFEAT_LOCAL_SERVER": "0"}, {"DINOFEAT_LOCAL_SERVER": "1", "XDG_RUNTIME_DIR": str(work / "rt")}
    (work / "rt").mkdir(mode=0o700)
    times: dict[str, list[float]] = {"skimage": [], "dinofeat cold": [], "dinofeat warm": []}
    classes: dict[str, np.ndarray] = {}
    try:
        with environment(**warm):
            start = peers.dinofeat_segment(image_file, scribbles_file, "multiscale", work).seconds
        print(f"  the local server started (untimed: {start:.2f} s for that first command)", flush=True)
        for run in range(runs):
            out = peers.fresh(work, "skimage") / "classes.tif"
            seconds, _ = peers.run([peers.sys.executable, str(script), str(image_file), str(scribbles_file), str(out)], work,
                                   "the scikit-image script")
            times["skimage"].append(seconds)
            classes["skimage"] = tifffile.imread(out)
            for tool, env in (("dinofeat cold", cold), ("dinofeat warm", warm)):
                with environment(**env):
                    outcome = peers.dinofeat_segment(image_file, scribbles_file, "multiscale", work)
                times[tool].append(outcome.seconds)
                classes[tool] = outcome.classes
            print(f"  run {run + 1}/{runs}: " + ", ".join(f"{tool} {values[-1]:.2f} s" for tool, values in times.items()), flush=True)
    finally:
        with environment(**warm):
            peers.run([peers.dinofeat_cli(), "local", "stop"], work, "dinofeat local stop")
    medians = {tool: statistics.median(values) for tool, values in times.items()}
    return {"times_s": times, "median_s": medians,
            "ratio": {tool: medians[tool] / medians["skimage"] for tool in ("dinofeat cold", "dinofeat warm")},
            "miou": {tool: mean_iou(found, case.truth) for tool, found in classes.items()}}


def bank_at_one_thread(runs: int) -> dict:
    """(b): the default bank at one torch thread against scikit-image's features, in this process, alternating."""
    image = tifffile.imread(cases.DATA / CASE / "image.tif")
    scaled = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    tensor = torch.from_numpy(scaled)[None, None]
    torch.set_num_threads(1)
    tools = {
        "dinofeat multiscale (53 ch, 1 thread)": lambda: multiscale_features(tensor),
        "skimage (20 ch, default workers)": lambda: multiscale_basic_features(scaled, sigma_min=1, sigma_max=16),
        "skimage (20 ch, workers=1)": lambda: multiscale_basic_features(scaled, sigma_min=1, sigma_max=16, workers=1),
    }
    times: dict[str, list[float]] = {name: [] for name in tools}
    with torch.inference_mode():
        for function in tools.values():
            function()  # warm-up
        for _ in range(runs):
            for name, function in tools.items():
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ours, names = medians[next(iter(tools))], list(tools)
    return {"times_s": times, "median_s": medians, "ratio_to_skimage_default": ours / medians[names[1]],
            "ratio_to_skimage_one_worker": ours / medians[names[2]]}


def load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="end-to-end runs of each tool (alternating); times are medians")
    parser.add_argument("--bank-runs", type=int, default=21, help="runs of each bank (alternating, after a warm-up)")
    args = parse_args(parser, quick={"runs": 3, "bank_runs": 7})
    began, load_before = time.perf_counter(), load()
    print(f"(a) dinofeat segment against the scikit-image script, {CASE}, {args.runs} runs each, alternating "
          f"({peers.THREADS} threads per process)")
    with tempfile.TemporaryDirectory(prefix="bench_interactive.") as folder:
        segment = end_to_end(args.runs, Path(folder))
    print(f"(b) the default bank at one thread against scikit-image's features, {args.bank_runs} runs each, alternating")
    bank = bank_at_one_thread(args.bank_runs)
    load_after = load()
    rows = [[f"(a) segment, end to end (process), {tool}", f"{segment['median_s'][tool]:.2f} s",
             f"{segment['median_s']['skimage']:.2f} s", f"{segment['ratio'][tool]:.2f}",
             "met" if segment["ratio"][tool] <= 1 else "not met"] for tool in ("dinofeat cold", "dinofeat warm")]
    names = list(bank["median_s"])
    for name, key in ((names[1], "ratio_to_skimage_default"), (names[2], "ratio_to_skimage_one_worker")):
        rows.append([f"(b) bank vs {name}", f"{bank['median_s'][names[0]] * 1e3:.0f} ms", f"{bank['median_s'][name] * 1e3:.0f} ms",
                     f"{bank[key]:.2f}", "met" if bank[key] <= 1 else "not met"])
    print()
    print(f"Interactive speed, medians; load average before {load_before}, after {load_after}")
    print(peers.markdown(["measure", "dinofeat", "scikit-image", "ratio", "target (ratio <= 1)"], rows))
    print("mIoU: " + ", ".join(f"{tool} {value:.4f}" for tool, value in segment["miou"].items()))
    elapsed = time.perf_counter() - began
    print(f"took {elapsed:.0f} s")
    save("interactive", {"case": CASE, "threads_per_process": peers.THREADS, "load_average": {"before": load_before, "after": load_after},
                         "segment": segment, "bank_one_thread": bank, "elapsed_s": elapsed})


if __name__ == "__main__":
    main()
