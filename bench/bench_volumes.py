"""Volume throughput (voxels/s) of `dinofeat features VOLUME -o OUT.zarr`: in this process (no Dask, one torch
thread) and as Dask tasks on a LocalCluster of 1 and 2 worker processes with one thread each.

Each run is the whole job of the command: fit the space (one task), create the store, one task per slice
writing its own OME-Zarr chunks. Cluster start-up and the workers' first import of torch are left out (a lab's
workers stay up); a small warm-up volume runs first on every cluster for that. The volume is a TIFF stack of
smooth random uint8 slices in a temporary folder (the workers read it from there, as from shared storage).
Usage: python bench/bench_volumes.py [--shape 16 512 512] [--set classical] [--workers 1 2] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import parse_args, save


def smooth_volume(shape: tuple[int, ...]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(0).random(shape)
    image = gaussian_filter(noise, (0, 2, 2)) + 0.3 * noise
    return np.round(255 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)


def timed_run(volume: Path, output: Path, feature_set: str, client) -> float:
    from dinofeat_server.volumes import features_to_zarr

    started = time.perf_counter()
    features_to_zarr(volume, output, feature_set, device="cpu", client=client, overwrite=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(output)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--set", default="classical", help="feature set (default classical)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker counts (default 1 2)")
    args = parse_args(parser, quick={"shape": [4, 256, 256]})
    import tifffile
    import torch
    from distributed import Client, LocalCluster

    voxels = int(np.prod(args.shape))
    results = {"shape": args.shape, "feature_set": args.set, "voxels": voxels, "load_average_before": os.getloadavg()[0],
               "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        volume, warm = Path(folder) / "volume.tif", Path(folder) / "warm.tif"
        tifffile.imwrite(volume, smooth_volume(tuple(args.shape)), photometric="minisblack")
        tifffile.imwrite(warm, smooth_volume((2, 64, 64)), photometric="minisblack")
        torch.set_num_threads(1)
        timed_run(warm, Path(folder) / "warm.zarr", args.set, None)
        seconds = timed_run(volume, Path(folder) / "out.zarr", args.set, None)
        results["runs"].append({"how": "in process, no Dask, 1 thread", "workers": 0, "seconds": seconds, "voxels_per_s": voxels / seconds})
        print(f"in process (1 thread): {seconds:.2f} s, {voxels / seconds / 1e6:.3f} Mvoxel/s")
        for workers in args.workers:
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
                timed_run(warm, Path(folder) / "warm.zarr", args.set, client)
                seconds = timed_run(volume, Path(folder) / "out.zarr", args.set, client)
            results["runs"].append({"how": f"Dask LocalCluster, {workers} worker(s) x 1 thread", "workers": workers,
                                    "seconds": seconds, "voxels_per_s": voxels / seconds})
            print(f"Dask, {workers} worker(s) x 1 thread: {seconds:.2f} s, {voxels / seconds / 1e6:.3f} Mvoxel/s")
    results["load_average_after"] = os.getloadavg()[0]
    save("volumes", results)


if __name__ == "__main__":
    main()
