"""DINOv2 feature extraction time per preset (and peak memory on a GPU).

Timing does not depend on the weights' values, so the real architectures are built with random
weights (no download needed). Target on a CPU: `fast` ViT-S at 518x518 <= 2 s end to end.
On a GPU: `paper` ViT-S at 518x518 (17 views, bf16): time, peak memory, effective TFLOP/s.
Usage: python bench/bench_deep.py [--backbones dinov2_vits14 ...] [--sizes 518 ...] [--presets fast default paper]
       [--repeats 3] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from dinofeat_server.engine.backbone import DinoVisionTransformer, forward_flops, token_grid
from dinofeat_server.engine.deep import PRESETS, DeepExtractor
from dinofeat_server.engine.weights import official_config
from machine import parse_args, save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", default=["dinov2_vits14"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[518])
    parser.add_argument("--presets", nargs="+", default=["fast", "default", "paper"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser, quick={"presets": ["fast"], "repeats": 1})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for backbone in args.backbones:
        model = DinoVisionTransformer(official_config(backbone)).eval()
        extractor = DeepExtractor(model, device)
        for size in args.sizes:
            image = np.random.default_rng(0).random((size, size)).astype(np.float32)
            for name in args.presets:
                spec = PRESETS[name]
                sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
                extractor.features(image, spec)
                sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    extractor.features(image, spec)
                    sync()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                tokens = token_grid(size, 14, spec.stride) ** 2
                flops = forward_flops(model.config, tokens) * spec.view_count()
                row = {"seconds": seconds, "views": spec.view_count(), "stride": spec.stride, "tokens_per_view": tokens,
                       "vit_TFLOP": flops / 1e12, "effective_TFLOP_per_s": flops / seconds / 1e12}
                if device.type == "cuda":
                    row["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
                results[f"{backbone}/{size}/{name}"] = row
                print(f"{backbone} {size}x{size} {name:<6} {seconds:7.3f} s  {spec.view_count():>2} views  "
                      f"{row['effective_TFLOP_per_s']:.2f} TFLOP/s" + (f"  {row['peak_memory_GB']:.2f} GB" if "peak_memory_GB" in row else ""))
    save("deep", {"device": str(device), **results})


if __name__ == "__main__":
    main()
