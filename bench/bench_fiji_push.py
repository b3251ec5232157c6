"""Pushing a feature stack into the JVM as a labelled ImageJ ImageStack (Debian's ImageJ1 via JPype),
one bulk copy per plane, and reading it back. Default: 64 channels of 2048x2048 float32 (1.07 GB).
Skipped, with one line, where the JVM or the ImageJ1/JHDF5 jars are absent.
Usage: python bench/bench_fiji_push.py [--channels 64] [--size 2048] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from dinofeat.contract.errors import DinofeatError
from dinofeat_client.fiji.imagestack import array_from_stack, stack_from_array
from dinofeat_client.fiji.jvm import start_imagej1
from machine import parse_args, save, skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=2048)
    args = parse_args(parser, quick={"channels": 16, "size": 1024})
    started = time.perf_counter()
    try:
        start_imagej1(jvm_options=("-Xmx8g",))
    except ImportError:
        skip("bench_fiji_push", "JPype is not installed (pip install jpype1, or dinofeat[fiji]).")
    except DinofeatError as why:
        skip("bench_fiji_push", str(why))
    jvm_seconds = time.perf_counter() - started
    features = np.random.default_rng(0).random((args.channels, args.size, args.size), dtype=np.float32)
    names = [f"feature_{i:02d}" for i in range(args.channels)]
    stack_from_array(features[:2, :64, :64], names[:2])  # warm up JPype's conversions
    started = time.perf_counter()
    stack = stack_from_array(features, names)
    push_seconds = time.perf_counter() - started
    started = time.perf_counter()
    back = array_from_stack(stack)
    pull_seconds = time.perf_counter() - started
    assert np.array_equal(back, features) and stack.getSliceLabel(args.channels) == names[-1]
    megabytes = features.nbytes / 1e6
    results = {"channels": args.channels, "size": args.size, "MB": megabytes, "jvm_start_s": jvm_seconds,
               "push_s": push_seconds, "push_MB_per_s": megabytes / push_seconds, "read_back_s": pull_seconds}
    print(f"JVM start {jvm_seconds:.2f} s; pushed {args.channels}x{args.size}x{args.size} float32 ({megabytes:.0f} MB) as a "
          f"labelled ImageStack in {push_seconds:.2f} s ({megabytes / push_seconds:.0f} MB/s); read back in {pull_seconds:.2f} s")
    save("fiji_push", results)


if __name__ == "__main__":
    main()
