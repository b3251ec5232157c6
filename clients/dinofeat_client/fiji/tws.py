"""Trainable Weka Segmentation on dinofeat features, through TWS's array-based API (needs a Fiji with TWS).

TWS takes custom features only as FeatureStack/FeatureStackArray with `setFeatureStackArray`, and
applies them only through `applyClassifier(imp, fsa, threads, probabilityMaps)`; the ImagePlus-only
variants recompute Weka's own features and silently drop ours. Loading a classifier marks the
features dirty, so the array is set again after loading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dinofeat.contract.errors import DinofeatError

from .imagestack import array_from_stack, labelled_stack, stack_from_h5


DESCRIPTION_SUFFIX = ".dinofeat.json"
"""Beside each classifier `dinofeat fiji train` writes: its features' computation and feature space, which `fiji apply`
adopts (TWS's .model file has no room for them)."""


def description_path(classifier_path: str | Path) -> Path:
    """Where the description of a TWS classifier's features lies: CLASSIFIER.model.dinofeat.json."""
    classifier_path = Path(classifier_path)
    return classifier_path.with_name(classifier_path.name + DESCRIPTION_SUFFIX)


def image_plus(image: np.ndarray, title: str = "image"):
    """An ImagePlus of a (Y, X) or (Z, Y, X) greyscale image (float)."""
    from ij import ImagePlus

    planes = image[None] if image.ndim == 2 else image
    return ImagePlus(title, labelled_stack(planes, [""] * len(planes), planes.shape[2], planes.shape[1]))


def class_roi(mask: np.ndarray):
    """An ij Roi covering the True pixels of a (Y, X) mask (ThresholdToSelection of a 0/255 mask)."""
    from ij import ImagePlus
    from ij.plugin.filter import ThresholdToSelection
    from ij.process import ByteProcessor, ImageProcessor

    import jpype

    pixels = jpype.JArray(jpype.JByte)((mask.astype(np.uint8) * 255).view(np.int8).ravel())
    processor = ByteProcessor(mask.shape[1], mask.shape[0], pixels)
    processor.setThreshold(255, 255, ImageProcessor.NO_LUT_UPDATE)
    return ThresholdToSelection.run(ImagePlus("mask", processor))


def feature_stack_array(features_h5: str | Path, slices: int, width: int, height: int):
    """A TWS FeatureStackArray with one FeatureStack per slice, its slices named after the channels."""
    from trainableSegmentation import FeatureStack, FeatureStackArray

    array = FeatureStackArray(slices)
    for z in range(slices):
        stack = FeatureStack(width, height, False)
        stack.setStack(stack_from_h5(features_h5, z if slices > 1 else None))
        array.set(stack, z)
    return array


def train(image: np.ndarray, labels: np.ndarray, features_h5: str | Path | None, classifier_path: str | Path,
          seed: int | None = None) -> list[int]:
    """Train TWS's default classifier (a fast random forest of 200 trees) on the labelled pixels of our
    features (or, with `features_h5` None, of TWS's own default features); save it; return the class
    values, ascending. `seed` fixes the forest's random seed (TWS draws one otherwise)."""
    from trainableSegmentation import WekaSegmentation

    slices = 1 if image.ndim == 2 else image.shape[0]
    imp = image_plus(image)
    segmentation = WekaSegmentation(imp)
    if features_h5 is not None:
        segmentation.setFeatureStackArray(feature_stack_array(features_h5, slices, image.shape[-1], image.shape[-2]))
    if seed is not None:
        segmentation.getClassifier().setSeed(seed)
    try:
        return trained(segmentation, labels, classifier_path)
    finally:
        segmentation.shutDownNow()  # TWS's worker threads would keep the JVM, and so this process, alive


def trained(segmentation, labels: np.ndarray, classifier_path: str | Path) -> list[int]:
    """Add each class's labelled pixels as examples, train, save; the class values, ascending."""
    values = [int(v) for v in np.unique(labels[labels != 0])]
    while segmentation.getNumOfClasses() < len(values):
        segmentation.addClass()
    for index, value in enumerate(values):
        segmentation.setClassLabel(index, str(value))
        for z, plane in enumerate(labels[None] if labels.ndim == 2 else labels):
            if (plane == value).any():
                segmentation.addExample(index, class_roi(plane == value), z + 1)
    if not segmentation.trainClassifier():
        raise DinofeatError("Trainable Weka Segmentation could not train on these labels; label at least two classes.")
    if not segmentation.saveClassifier(str(classifier_path)):
        raise DinofeatError(f"Trainable Weka Segmentation could not save the classifier to {classifier_path}.")
    return values


def apply(classifier_path: str | Path, image: np.ndarray, features_h5: str | Path | None) -> tuple[np.ndarray, list[int]]:
    """Probabilities (K, Y, X) or (Z, K, Y, X) of a saved TWS classifier on `image` with our features (or,
    with `features_h5` None, TWS's own), and the class values."""
    from trainableSegmentation import WekaSegmentation

    slices = 1 if image.ndim == 2 else image.shape[0]
    imp = image_plus(image)
    segmentation = WekaSegmentation(imp)
    try:
        return applied(segmentation, imp, classifier_path, features_h5, slices, image.shape[-2:])
    finally:
        segmentation.shutDownNow()  # TWS's worker threads would keep the JVM, and so this process, alive


def applied(segmentation, imp, classifier_path: str | Path, features_h5: str | Path | None, slices: int,
            size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """Load the classifier and compute its probabilities with our features (or TWS's own)."""
    height, width = size
    if not segmentation.loadClassifier(str(classifier_path)):
        raise DinofeatError(f"{classifier_path} is not a classifier Trainable Weka Segmentation can load.")
    if features_h5 is None:
        result = segmentation.applyClassifier(imp, 0, True)
    else:
        array = feature_stack_array(features_h5, slices, width, height)
        segmentation.setFeatureStackArray(array)  # again after loading: loading marks the features dirty
        expected = segmentation.getTrainHeader().numAttributes() - 1
        if expected != array.get(0).getSize():
            raise DinofeatError(f"the classifier was trained on {expected} features but this feature set gives "
                                f"{array.get(0).getSize()}; use the feature set it was trained with.")
        result = segmentation.applyClassifier(imp, array, 0, True)
    values = class_values([str(label) for label in segmentation.getClassLabels()][: segmentation.getNumOfClasses()])
    probabilities = array_from_stack(result.getStack()).reshape(slices, len(values), height, width)
    return (probabilities[0] if slices == 1 else probabilities), values


def class_values(names: list[str]) -> list[int]:
    """The class map's value of each TWS class: its name when every name is a number (classifiers from
    `dinofeat fiji train`), else 1, 2, ... in TWS's order (names such as "class 1" or "cells" from TWS itself)."""
    try:
        return [int(name) for name in names]
    except ValueError:
        return list(range(1, len(names) + 1))


def class_map(probabilities: np.ndarray, values: list[int]) -> np.ndarray:
    """The most probable class per pixel, in the label values (uint16)."""
    axis = 0 if probabilities.ndim == 3 else 1
    return np.asarray(values, dtype=np.uint16)[np.argmax(probabilities, axis=axis)]
