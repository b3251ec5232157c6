"""Volume throughput (voxels/s) of `dinofeat features VOLUME -o OUT.zarr` and `dinofeat apply MODEL VOLUME -o OUT.zarr`:
in this process (no Dask, one torch thread) and as Dask tasks on a LocalCluster of 1 and 2 worker processes with one
thread each; and an estimate (no GPU run) of a 2000 x 4096 x 4096 volume's deep features on 8 GPUs.

Each run is the whole job of the command: fit the space (one task), create the store, one task per slice
writing its own OME-Zarr chunks. Cluster start-up and the workers' first import of torch are left out (a lab's
workers stay up); a small warm-up volume runs first on every cluster for that. The volume is a TIFF stack of
smooth random uint8 slices in a temporary folder (the workers read it from there, as from shared storage). The
applied model is a 50-tree forest on `classical` features, trained (in this process) on scribbles of the middle slice.

The estimate counts the ViT's floating-point operations (`backbone.forward_flops`, from the architecture: patch
tokens of each tile, depth, width, MLP) for every tile of the engine's own tile plan of a 4096 x 4096 slice
(`DeepExtractor.plan` on a CUDA device with a Dask worker's tile budget, `ModelRegistry`'s default of 1 GiB, and 32
output channels, hybrid's PCA) and every view of the preset, times 2000 slices, at a stated GPU throughput. It leaves
out upsampling, blending, PCA, reading and writing: a lower bound on the time, labelled an estimate until a GPU run
replaces it.
Usage: python bench/bench_volumes.py [--shape 16 512 512] [--set classical] [--workers 1 2] [--estimate-only]
                                     [--quick | --full] [--save]
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


ESTIMATE_SHAPE = (2000, 4096, 4096)
ESTIMATE_GPUS = 8
GPU_PEAK_FLOPS = 989e12
"""H100 / H200 SXM, bf16 dense tensor cores (NVIDIA's data sheets; the same for both)."""
GPU_SHARE = 0.40
"""The share of that peak assumed sustained by the ViT's matrix products."""
ESTIMATE_CHANNELS = 32
"""Output channels the tile plan is sized for: hybrid's default PCA."""


def timed_run(volume: Path, output: Path, feature_set: str, client, model: Path | None = None) -> float:
    """Seconds of one whole run into `output` (removed afterwards): the features, or with `model` its apply."""
    from dinofeat.contract.computation import FeatureComputation
    from dinofeat_server.volumes import classify_to_zarr, features_to_zarr

    started = time.perf_counter()
    if model is None:
        features_to_zarr(volume, output, FeatureComputation(feature_set), device="cpu", client=client, overwrite=True)
    else:
        classify_to_zarr(volume, model, output, device="cpu", client=client, overwrite=True)
    seconds = time.perf_counter() - started
    shutil.rmtree(output)
    return seconds


def trained_model(volume: Path, folder: Path) -> Path:
    """A 50-tree forest on `classical` features of scribbles on the middle slice, saved as a model file."""
    import tifffile
    from dinofeat.contract.computation import FeatureComputation
    from dinofeat_server.volumes import segment_to_zarr

    image = tifffile.imread(volume)
    labels = np.zeros(image.shape, np.uint8)
    middle = len(image) // 2
    labels[middle, ::7, ::7] = np.where(image[middle, ::7, ::7] > np.median(image), 2, 1)
    tifffile.imwrite(folder / "labels.tif", labels, photometric="minisblack")
    model = folder / "model.dfm"
    segment_to_zarr(volume, folder / "labels.tif", folder / "seg.zarr", FeatureComputation("classical"), trees=50, device="cpu", model=model)
    return model


def slice_plan(size: str, preset_name: str) -> tuple[int, int, float]:
    """(tile edge, tiles, ViT operations) of one 4096 x 4096 slice for a ViT-`size`/14 with `preset_name`'s views, in
    the tile plan a CUDA worker of this engine makes (its own `plan`, with the model's architecture only)."""
    from types import SimpleNamespace

    import torch
    from dinofeat_server.engine.backbone import OFFICIAL_CONFIGS, forward_flops, token_grid
    from dinofeat_server.engine.deep import DEFAULT_BUDGET_BYTES, PRESETS, DeepExtractor
    from dinofeat_server.engine.tiles import tile_plan

    config, spec = OFFICIAL_CONFIGS[size], PRESETS[preset_name]
    planner = object.__new__(DeepExtractor)  # plan() reads only the config, the device type and the budget: no weights
    planner.model, planner.device, planner.budget_bytes = SimpleNamespace(config=config), torch.device("cuda"), DEFAULT_BUDGET_BYTES
    _, height, width = ESTIMATE_SHAPE
    edge, _ = planner.plan(height, width, spec, ESTIMATE_CHANNELS)
    tiles = tile_plan(height, width, edge, align=spec.stride)
    flops = sum(forward_flops(config, token_grid(t.height, config.patch, spec.stride) * token_grid(t.width, config.patch, spec.stride))
                for t in tiles) * spec.view_count()
    return edge, len(tiles), flops


def gpu_estimate() -> dict:
    """The estimated hours of the ViT's work for ESTIMATE_SHAPE on ESTIMATE_GPUS GPUs, per backbone and preset."""
    rate = ESTIMATE_GPUS * GPU_PEAK_FLOPS * GPU_SHARE
    rows = []
    for size, name in (("s", "ViT-S/14"), ("b", "ViT-B/14")):
        for preset_name in ("fast", "default"):
            edge, tiles, flops = slice_plan(size, preset_name)
            total = flops * ESTIMATE_SHAPE[0]
            rows.append({"backbone": name, "preset": preset_name, "tile_edge": edge, "tiles_per_slice": tiles,
                         "flops_per_slice": flops, "flops_total": total, "hours": total / rate / 3600})
    output_tb = float(np.prod(ESTIMATE_SHAPE)) * ESTIMATE_CHANNELS * 4 / 1e12
    return {"label": "ESTIMATE, not a measurement: ViT operations only (no upsampling, blending, PCA, I/O)",
            "shape": list(ESTIMATE_SHAPE), "gpus": ESTIMATE_GPUS,
            "gpu": f"H100/H200 bf16 dense at {GPU_SHARE:.0%} of its {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s peak",
            "tile_budget_bytes": 1 << 30, "output_channels": ESTIMATE_CHANNELS, "output_tb_float32": output_tb, "rows": rows}


def print_estimate(estimate: dict) -> None:
    print(f"{estimate['label']}\n{' x '.join(map(str, estimate['shape']))} voxels on {estimate['gpus']} GPUs, {estimate['gpu']}; "
          f"output {estimate['output_tb_float32']:.1f} TB ({estimate['output_channels']} float32 channels)")
    for row in estimate["rows"]:
        print(f"  {row['backbone']:<9} {row['preset']:<8} tiles {row['tiles_per_slice']:>3} of <= {row['tile_edge']} px, "
              f"{row['flops_per_slice'] / 1e12:9.1f} TFLOP/slice, {row['flops_total'] / 1e15:9.0f} PFLOP, "
              f"about {row['hours'] * 60:7.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--set", default="classical", help="feature set (default classical)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker counts (default 1 2)")
    parser.add_argument("--estimate-only", action="store_true", help="print the GPU estimate only (no measurement, nothing saved)")
    args = parse_args(parser, quick={"shape": [4, 256, 256]})
    estimate = gpu_estimate()
    print_estimate(estimate)
    if args.estimate_only:
        return
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
        model = trained_model(volume, Path(folder))
        results["applies"] = []
        for workers in args.workers:
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
                timed_run(warm, Path(folder) / "warm.zarr", args.set, client)
                seconds = timed_run(volume, Path(folder) / "out.zarr", args.set, client)
                applied = timed_run(volume, Path(folder) / "labels.zarr", args.set, client, model)
            results["runs"].append({"how": f"Dask LocalCluster, {workers} worker(s) x 1 thread", "workers": workers,
                                    "seconds": seconds, "voxels_per_s": voxels / seconds})
            results["applies"].append({"how": f"apply (50 trees, classical), Dask LocalCluster, {workers} worker(s) x 1 thread",
                                       "workers": workers, "seconds": applied, "voxels_per_s": voxels / applied})
            print(f"Dask, {workers} worker(s) x 1 thread: features {seconds:.2f} s, {voxels / seconds / 1e6:.3f} Mvoxel/s; "
                  f"apply {applied:.2f} s, {voxels / applied / 1e6:.3f} Mvoxel/s")
    results["load_average_after"] = os.getloadavg()[0]
    results["gpu_estimate"] = estimate
    save("volumes", results)


if __name__ == "__main__":
    main()
