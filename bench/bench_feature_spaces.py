"""Deep features at any image size: peak memory, feature-space fit time and wall time, tile by tile.

Each case runs `FeatureClient.fetch_features` against an embedded server in a fresh process, exactly
as `dinofeat features IMAGE --set hybrid --preset fast` does (random-weight ViT-S/14 of the real
architecture, result cache off, default memory target of 3 GB), and reports:
- peak resident memory of that process (client and server together, VmHWM),
- fit: seconds from the request to the end of the feature-space fit,
- first chunk: seconds to the first deep chunk on the wire (targets: within the fit plus two tiles),
- wall: seconds to the finished file, and the number of tiles.
Targets on a 2-core CPU: peak RSS <= 3 GB at every size (flat from 2048 up), time linear in pixels,
fit <= a quarter of the total at 4096^2.
Disk: the largest case writes about 4.5 GB (8192^2 x 16 channels, gzip) into a temporary folder,
removed after each case; 7 GB free is enough.
Usage: python bench/bench_feature_spaces.py [--cases hybrid:512 ... dinov2:8192:16] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import parse_args

CASES = ["hybrid:512", "hybrid:1024", "hybrid:2048", "hybrid:4096", "dinov2:8192:16"]


def peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def one_case(feature_set: str, size: int, pca: int, weights: str, folder: str) -> dict:
    """Run in a fresh process: one request through an embedded server, timed by its progress messages."""
    import numpy as np
    from dinofeat_client.client import FeatureClient
    from dinofeat_server.service.server import EmbeddedServer

    rng = np.random.default_rng(0)
    small = (rng.random((size // 8 + 1, size // 8 + 1)) * 255).astype(np.float32)
    image = np.kron(small, np.ones((8, 8), np.float32))[:size, :size] + rng.normal(0, 8, (size, size)).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)  # structure at several scales, not white noise
    marks: dict[str, float] = {}
    tiles = [0]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter() - started
        if stage == "fitting the feature space" and done == total:
            marks.setdefault("fit_s", now)
        if stage == "tiles":
            marks.setdefault("fit_s", now)
            tiles[0] = total
        if stage == "features" and done:
            marks.setdefault("first_chunk_s", now)

    with EmbeddedServer("cpu", {"dinov2_vits14": weights}) as address, FeatureClient(address) as client:
        started = time.perf_counter()
        client.fetch_features(image, Path(folder) / "features.h5", feature_set, preset="fast", pca=pca, progress=progress)
        wall = time.perf_counter() - started
    size_bytes = (Path(folder) / "features.h5").stat().st_size
    return {"set": feature_set, "size": size, "pca": pca, "wall_s": wall, "tiles": tiles[0], **marks,
            "peak_rss_GB": peak_rss() / 1e9, "file_GB": size_bytes / 1e9, "megapixels_per_s": size * size / wall / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=CASES, help="SET:SIZE[:PCA]")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parse_args(parser, quick={"cases": ["hybrid:512"]})
    if args.one:
        feature_set, size, pca, weights, folder = args.one
        print(json.dumps(one_case(feature_set, int(size), int(pca), weights, folder)))
        return
    import torch
    from dinofeat_server.engine.backbone import DinoVisionTransformer
    from dinofeat_server.engine.weights import official_config
    from machine import save

    results = {}
    with tempfile.TemporaryDirectory() as weights_folder:
        weights = Path(weights_folder) / "random_vits14.pth"
        torch.manual_seed(0)
        torch.save(DinoVisionTransformer(official_config("dinov2_vits14")).state_dict(), weights)
        print(f"{'case':<16}{'tiles':>6}{'fit s':>8}{'1st chunk s':>12}{'wall s':>9}{'Mpx/s':>7}{'peak RSS GB':>12}{'file GB':>9}")
        for case in args.cases:
            feature_set, size, *rest = case.split(":")
            pca = rest[0] if rest else "0"
            with tempfile.TemporaryDirectory() as folder:
                done = subprocess.run([sys.executable, __file__, "--one", feature_set, size, pca, str(weights), folder],
                                      capture_output=True, text=True)
            if done.returncode:
                print(f"{case}: failed\n{done.stderr}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results[case] = row
            print(f"{case:<16}{row['tiles']:>6}{row.get('fit_s', 0):>8.1f}{row.get('first_chunk_s', 0):>12.1f}{row['wall_s']:>9.1f}"
                  f"{row['megapixels_per_s']:>7.2f}{row['peak_rss_GB']:>12.2f}{row['file_GB']:>9.2f}", flush=True)
    save("feature_spaces", results)


if __name__ == "__main__":
    main()
