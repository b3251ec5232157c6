"""ilastik provider: time and file size per image for `--set hybrid --pca 48`.

Uses an embedded server with a ViT-S of the real architecture and random weights (timing does not
depend on the weights' values; no download needed).
Usage: python bench/bench_ilastik.py [--sizes 512 2048] [--preset fast] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dinofeat_client.client import FeatureClient
from dinofeat.contract.computation import FeatureComputation
from dinofeat_client.ilastik.provider import IlastikSpec, build_project
from dinofeat_server.engine.backbone import DinoVisionTransformer
from dinofeat_server.engine.weights import official_config
from dinofeat_server.service.server import EmbeddedServer
from machine import parse_args, save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--preset", default="fast")
    args = parse_args(parser, quick={"sizes": [512]})
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "vits14.pth"
        torch.save(DinoVisionTransformer(official_config("dinov2_vits14")).state_dict(), weights)
        with EmbeddedServer("auto", {"dinov2_vits14": str(weights)}) as address, FeatureClient(address) as client:
            for size in args.sizes:
                image = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
                project = Path(folder) / f"p{size}"
                project.mkdir()
                start = time.perf_counter()
                _, files = build_project(client, [(f"img{size}.tif", image)], project, IlastikSpec(FeatureComputation("hybrid", preset=args.preset, pca=48)))
                seconds = time.perf_counter() - start
                megabytes = files[0].stat().st_size / 1e6
                results[f"{size}x{size}"] = {"seconds": seconds, "file_MB": megabytes, "channels": 48 + 58, "preset": args.preset}
                print(f"{size}x{size} hybrid pca 48 ({args.preset}): {seconds:.1f} s, {megabytes:.1f} MB")
    save("ilastik", results)


if __name__ == "__main__":
    main()
