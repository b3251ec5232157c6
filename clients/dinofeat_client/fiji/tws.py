"""Trainable Weka Segmentation on dinofeat features, through TWS's array-based API (needs a Fiji with TWS).

TWS takes custom features only as FeatureStack/FeatureStackArray with `setFeatureStackArray`, and
applies them only through `applyClassifier(imp, fsa, threads, probabilityMaps)`; the ImagePlus-only
variants recompute Weka's own features and silently drop ours. Loading a classifier marks the
features dirty, so the array is set again after loading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DinofeatError
from .imagestack import array_from_stack, labelled_stack, stack_from_h5


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


def train(image: np.ndarray, labels: np.ndarray, features_h5: str | Path, classifier_path: str | Path) -> list[int]:
    """Train TWS's default classifier (a fast random forest) on the labelled pixels; save it; return the class values."""
    from trainableSegmentation import WekaSegmentation

    slices = 1 if image.ndim == 2 else image.shape[0]
    imp = image_plus(image)
    segmentation = WekaSegmentation(imp)
    segmentation.setFeatureStackArray(feature_stack_array(features_h5, slices, image.shape[-1], image.shape[-2]))
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


def apply(classifier_path: str | Path, image: np.ndarray, features_h5: str | Path) -> tuple[np.ndarray, list[int]]:
    """Probabilities (K, Y, X) or (Z, K, Y, X) of a saved TWS classifier on `image`, and the class values."""
    from trainableSegmentation import WekaSegmentation

    slices = 1 if image.ndim == 2 else image.shape[0]
    imp = image_plus(image)
    segmentation = WekaSegmentation(imp)
    if not segmentation.loadClassifier(str(classifier_path)):
        raise DinofeatError(f"{classifier_path} is not a classifier Trainable Weka Segmentation can load.")
    array = feature_stack_array(features_h5, slices, image.shape[-1], image.shape[-2])
    segmentation.setFeatureStackArray(array)  # again after loading: loading marks the features dirty
    expected = segmentation.getTrainHeader().numAttributes() - 1
    if expected != array.get(0).getSize():
        raise DinofeatError(f"the classifier was trained on {expected} features but this feature set gives "
                            f"{array.get(0).getSize()}; use the feature set it was trained with.")
    result = segmentation.applyClassifier(imp, array, 0, True)
    values = [int(str(label)) for label in segmentation.getClassLabels()][: segmentation.getNumOfClasses()]
    probabilities = array_from_stack(result.getStack()).reshape(slices, len(values), image.shape[-2], image.shape[-1])
    return (probabilities[0] if slices == 1 else probabilities), values


def class_map(probabilities: np.ndarray, values: list[int]) -> np.ndarray:
    """The most probable class per pixel, in the label values (uint16)."""
    axis = 0 if probabilities.ndim == 3 else 1
    return np.asarray(values, dtype=np.uint16)[np.argmax(probabilities, axis=axis)]
