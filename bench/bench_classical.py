"""Classical bank speed: our 58 Weka-like channels against scikit-image's 20-channel
multiscale_basic_features (sigma 1..16, 5 scales), same machine, same run.

Targets: no more time than scikit-image's 20 channels on a CPU; <= 10 ms at 512x512 on a GPU.
Usage: python bench/bench_classical.py [--sizes 512 2048] [--repeats N] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from dinofeat_server.engine.classical import weka_features
from machine import parse_args, save
from skimage.feature import multiscale_basic_features


def timed(function, repeats: int, synchronise=lambda: None) -> float:
    """Median wall time in seconds over `repeats` runs, after one warm-up run."""
    function()
    synchronise()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, quick={"sizes": [512], "repeats": 1})
    if not torch.cuda.is_available():
        print("GPU timing skipped: torch sees no CUDA device")
    results = {}
    for size in args.sizes:
        image = np.random.default_rng(0).random((size, size)).astype(np.float32)
        tensor = torch.from_numpy(image)[None, None]
        with torch.inference_mode():
            ours = timed(lambda: weka_features(tensor), args.repeats)
        skimage = timed(lambda: multiscale_basic_features(image, sigma_min=1, sigma_max=16, num_sigma=5), args.repeats)
        row = {"dinofeat_58ch_cpu_s": ours, "skimage_20ch_cpu_s": skimage, "ratio_ours_over_skimage": ours / skimage}
        if torch.cuda.is_available():
            gpu = tensor.cuda()
            with torch.inference_mode():
                row["dinofeat_58ch_gpu_s"] = timed(lambda: weka_features(gpu), max(args.repeats, 10), torch.cuda.synchronize)
        results[f"{size}x{size}"] = row
        print(f"{size}x{size}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    save("classical", results)


if __name__ == "__main__":
    main()
