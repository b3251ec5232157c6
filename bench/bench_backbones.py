"""DINOv2 ViT-S/14 against DINOv3 ViT-S/16 and ViT-S+/16 (issue 28): time and peak memory of
`dinofeat features IMAGE -o OUT.h5 --set dinov2 --preset fast --backbone B --weights B.pth` end to end.

Each run is a process as a user starts it, without the local server (DINOFEAT_LOCAL_SERVER=0: an embedded
server in the command's process, so the time includes importing torch and loading the weights), with the
thread budget of peers.py (2 threads, pinned), the backbones alternating run by run; peak memory is the
process's maximum resident set (os.wait4). The output is written uncompressed (`--compression none`: 384
float32 channels, 1.6 GB at 1024 x 1024), so gzip's time does not hide the backbones'. DINOv3 weights cannot be downloaded here (the DINOv3 License), so
every backbone runs on a random checkpoint of its real architecture written by `dinofeat weights random`:
time and memory do not depend on the weights' values. On a GPU (torch sees CUDA) the commands run with
--device cuda and the rows name the GPU.

Usage: python bench/bench_backbones.py [--backbones dinov2_vits14 dinov3_vits16 dinov3_vits16plus]
       [--sizes 512 1024 2048] [--repeats 2] [--quick | --full] [--save]
Quick: --sizes 512 --repeats 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import peers
import tifffile
from machine import machine_info, parse_args, save

BACKBONES = ["dinov2_vits14", "dinov3_vits16", "dinov3_vits16plus"]


def test_image(size: int) -> np.ndarray:
    """A uint8 size x size image with structure at several scales (smooth waves and noise), seeded."""
    y, x = np.mgrid[0:size, 0:size] / size
    waves = np.sin(40 * x + 7 * np.sin(9 * y)) + np.cos(25 * y + 5 * np.cos(13 * x))
    noise = np.random.default_rng(size).normal(0, 0.4, (size, size))
    return np.clip(127 + 50 * (waves + noise), 0, 255).astype(np.uint8)


def measured(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run `command` with peers.py's thread budget; (wall seconds, peak resident memory in GB), or SystemExit
    with its last line when it fails. The child is reaped by os.wait4, which returns its own resource usage."""
    errors = cwd / "stderr.txt"
    with errors.open("wb") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env={**peers.tool_env(), "DINOFEAT_LOCAL_SERVER": "0"},
                                   stdout=subprocess.DEVNULL, stderr=sink, preexec_fn=peers._pin)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"bench_backbones: {' '.join(command[1:3])} failed: {peers.last_line(errors.read_text())}")
    return seconds, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux


def run_features(cli: str, image: Path, weights: Path, backbone: str, device: str, work: Path) -> tuple[float, float]:
    """One timed `dinofeat features ... --preset fast` of `image` with `backbone`; its output removed after."""
    output = work / "features.h5"
    try:
        return measured([cli, "features", str(image), "-o", str(output), "--set", "dinov2", "--preset", "fast",
                         "--backbone", backbone, "--weights", str(weights), "--device", device, "--quiet",
                         "--compression", "none", "--no-local-server"], work)
    finally:
        output.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    args = parse_args(parser, quick={"sizes": [512], "repeats": 1})
    device = "cuda" if "gpu" in machine_info() else "cpu"
    cli = peers.dinofeat_cli()
    results: dict = {"device": device, "load_average_before": os.getloadavg()[0], "runs": {}}
    print(f"{'backbone':<18} {'size':>9} {'median s':>9} {'best s':>7} {'peak GB':>8}  ({device}, {peers.THREADS} threads, "
          f"{args.repeats} runs each, backbones alternating)")
    with tempfile.TemporaryDirectory(prefix="bench_backbones_") as folder:
        work = Path(folder)
        weights = {backbone: work / f"{backbone}.pth" for backbone in args.backbones}
        for backbone, path in weights.items():
            peers.run([cli, "weights", "random", backbone, "-o", str(path)], work, f"dinofeat weights random {backbone}")
        for size in args.sizes:
            image = work / f"image_{size}.tif"
            tifffile.imwrite(image, test_image(size))
            runs: dict[str, list[tuple[float, float]]] = {backbone: [] for backbone in args.backbones}
            for _ in range(args.repeats):  # alternating, so that other load on the machine falls on every backbone alike
                for backbone in args.backbones:
                    runs[backbone].append(run_features(cli, image, weights[backbone], backbone, device, work))
            for backbone, measured_runs in runs.items():
                seconds = statistics.median(s for s, _ in measured_runs)
                peak = max(gb for _, gb in measured_runs)
                best = min(s for s, _ in measured_runs)  # the least disturbed by other load on a shared machine
                results["runs"][f"{backbone}/{size}"] = {"seconds": seconds, "best_seconds": best,
                                                         "all_seconds": [s for s, _ in measured_runs], "peak_memory_GB": peak}
                print(f"{backbone:<18} {size:>4}x{size:<4} {seconds:9.1f} {best:7.1f} {peak:8.2f}", flush=True)
            print(f"  (load average {os.getloadavg()[0]:.1f})", flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    save("backbones", results)


if __name__ == "__main__":
    main()
