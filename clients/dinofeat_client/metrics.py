"""Agreement of a class map with a ground truth (numpy only)."""

from __future__ import annotations

import numpy as np


def class_iou(prediction: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Intersection over union of each class value present in the ground truth."""
    return {
        int(v): float(((prediction == v) & (truth == v)).sum() / ((prediction == v) | (truth == v)).sum())
        for v in np.unique(truth)
    }


def mean_iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean of the per-class IoUs (mIoU)."""
    return float(np.mean(list(class_iou(prediction, truth).values())))


def class_dice(prediction: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice coefficient, 2 |P & T| / (|P| + |T|), of each class value present in the ground truth."""
    return {
        int(v): float(2 * ((prediction == v) & (truth == v)).sum() / ((prediction == v).sum() + (truth == v).sum()))
        for v in np.unique(truth)
    }
