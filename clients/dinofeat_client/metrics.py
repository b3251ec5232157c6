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


def assignment(cost: np.ndarray) -> np.ndarray:
    """Column assigned to each row of a (rows <= columns) cost matrix, minimising the total cost
    (the Hungarian method with potentials, O(n^2 m); numpy only, as scipy's linear_sum_assignment)."""
    n, m = cost.shape
    if n > m:
        raise ValueError("assignment needs at least as many columns as rows")
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=int)  # row (1-based) holding each column; column 0 is the start
    for row in range(1, n + 1):
        owner[0], column = row, 0
        slack, previous = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=int)
        used = np.zeros(m + 1, dtype=bool)
        while owner[column]:
            used[column] = True
            i = owner[column]
            free = ~used[1:]
            reduced = cost[i - 1] - u[i] - v[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better], previous[1:][better] = reduced[better], column
            candidates = np.where(free, slack[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[owner[used]] += delta
            v[used] -= delta
            slack[1:][free] -= delta
            column = nxt
        while column:
            owner[column] = owner[previous[column]]
            column = previous[column]
    result = np.zeros(n, dtype=int)
    for column in range(1, m + 1):
        if owner[column]:
            result[owner[column] - 1] = column - 1
    return result


def matched_to_truth(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The prediction with its values renamed to the ground truth's, pairing them one to one so that
    the pixels they share are as many as possible (Hungarian assignment on the confusion matrix);
    values left without a partner become 0. For clusterings, whose labels 1..k mean nothing alone."""
    predicted, predicted_index = np.unique(prediction, return_inverse=True)
    classes, class_index = np.unique(truth, return_inverse=True)
    confusion = np.zeros((len(predicted), len(classes)), dtype=np.int64)
    np.add.at(confusion, (predicted_index.ravel(), class_index.ravel()), 1)
    names = np.zeros(len(predicted), dtype=truth.dtype)
    if len(predicted) <= len(classes):
        names[:] = classes[assignment(-confusion)]
    else:
        rows = assignment(-confusion.T)
        names[rows] = classes
    return names[predicted_index].reshape(prediction.shape)
