"""Training plus full-image prediction time of the three classifiers on the classical stack.

Trained on ~1 % of pixels labelled in three classes (as the ISB scribbles), predicted on every pixel.
Usage: python bench/bench_classifiers.py [--sizes 512 2048] [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dinofeat_server.engine.stacks import CLASSICAL
from dinofeat_server.segment.classifiers import CLASSIFIERS, class_probabilities, labelled_pixels, train_classifier
from machine import parse_args, save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 2048])
    args = parse_args(parser, quick={"sizes": [256]})
    results = {}
    for size in args.sizes:
        rng = np.random.default_rng(0)
        image = rng.random((size, size)).astype(np.float32)
        features = CLASSICAL.compute(image)
        labels = np.zeros((size, size), np.uint8)
        picked = rng.random((size, size)) < 0.01
        labels[picked] = rng.choice([85, 170, 255], size=int(picked.sum()))
        samples, classes = labelled_pixels(features, labels)
        for kind in CLASSIFIERS:
            start = time.perf_counter()
            model = train_classifier(samples, classes, kind)
            trained = time.perf_counter()
            class_probabilities(model, features)
            done = time.perf_counter()
            results[f"{size}/{kind}"] = {"train_s": trained - start, "predict_s": done - trained, "labelled": int(len(classes))}
            print(f"{size}x{size} {kind:<18} train {trained - start:6.2f} s  predict {done - trained:6.2f} s  ({len(classes)} labelled px)")
    save("classifiers", results)


if __name__ == "__main__":
    main()
