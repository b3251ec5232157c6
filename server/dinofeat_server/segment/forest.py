"""Weakly supervised segmentation from sparse labels with a random forest, as in Trainable Weka.

Labels: 0 = unlabelled, any other value = a class. The class map keeps the user's own values
(85 / 170 / 255 stay 85 / 170 / 255); probabilities come per class, in ascending class value.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier

DEFAULT_TREES = 200


def labelled_pixels(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature vectors (N, C) and class values (N,) of the labelled pixels of a (C, ...) stack."""
    mask = labels != 0
    return features[:, mask].T, labels[mask]


def train_forest(samples: np.ndarray, classes: np.ndarray, trees: int = DEFAULT_TREES, seed: int = 0) -> RandomForestClassifier:
    """A random forest with Weka-like defaults: `trees` trees, classes balanced by their label counts."""
    forest = RandomForestClassifier(n_estimators=trees, class_weight="balanced", n_jobs=-1, random_state=seed)
    return forest.fit(samples, classes)


def class_probabilities(forest: RandomForestClassifier, features: np.ndarray) -> np.ndarray:
    """Per-class probabilities (K, ...) float32 of every pixel of a (C, ...) feature stack."""
    flat = features.reshape(features.shape[0], -1).T
    probabilities = forest.predict_proba(flat).astype(np.float32)
    return probabilities.T.reshape(len(forest.classes_), *features.shape[1:])
