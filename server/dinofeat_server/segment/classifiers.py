"""Weakly supervised segmentation from sparse labels: train a pixel classifier, predict every pixel.

Labels: 0 = unlabelled, any other value = a class. Class maps keep the user's own values
(85 / 170 / 255 stay 85 / 170 / 255); probabilities come per class, in ascending class value.
Classifiers, all with classes balanced by their label counts:
- extra_trees (the default): 200 extremely randomised trees (Geurts et al. 2006: each split draws 30 % of
  the channels and a random threshold in each, keeping the best), depth at most 10, leaves as below. A
  random forest puts each threshold halfway between the nearest labelled pixels of two classes, and
  sparse scribbles leave wide gaps there; random thresholds spread the boundary over the gap. On the
  demo's sample that predicts a third as many false particles along the bright grain rims (1279 pixels
  against 3688) and round the particles, on the large-objects case it misses fewer disc pixels (disc IoU
  0.798 against 0.781). On the declared tuning cases of bench/cases.py with
  `multiscale` (3 forest seeds) mean mIoU 0.749 against the random forest's 0.739 (each tuning case gains,
  similar phases least: 0.696 against 0.695; report cases 0.722 against 0.703); drawing 20 % or 50 % of the channels
  gave 0.748 and 0.747, the square root (13 %) 0.744, all channels 0.743; unlimited depth 0.749
  (bench/bench_bank_choice.py reruns the comparison with leaves of 5 on every case: 0.746 against 0.737);
- random_forest: Weka's and ilastik's kind of forest (the square root of the channels at each split, the
  best threshold), same trees, depth and leaves;
- both forests: leaves of at least 5 labelled pixels (single-pixel leaves fit the noise of sparse
  scribbles: with the random forest leaves of 5 beat 1, 2, 3 and 10, with extra trees 5 beat 3, 8 and
  12), smaller where the rarest class has fewer than 100 labelled pixels, so that it still fills 20
  leaves (a class of 27 pixels, as in the small-particles case, gets single-pixel leaves);
- logistic: the paper's choice for deep features (features standardised first);
- gradient_boosting: scikit-learn's histogram gradient boosting.
"""

from __future__ import annotations

import copy

import numpy as np
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import CLASSIFIERS, DEFAULT_CLASSIFIER, DEFAULT_TREES
from sklearn.base import ClassifierMixin
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FOREST_DEPTH = 10
FOREST_MIN_LEAF = 5
RAREST_CLASS_LEAVES = 20
"""Leaves shrink below FOREST_MIN_LEAF pixels until the rarest class's labelled pixels fill this many."""
EXTRA_TREES_FEATURES = 0.3
"""Fraction of the channels an extremely randomised tree draws at each split."""
FORESTS = {"extra_trees": (ExtraTreesClassifier, EXTRA_TREES_FEATURES), "random_forest": (RandomForestClassifier, "sqrt")}
"""Each forest's scikit-learn class and the channels it draws per split (the random forest: the square root of
their number, as Weka and ilastik do)."""
PREDICTION_PIXELS = 1 << 18
"""Most pixels predicted at a time."""
PREDICTION_BYTES = 32 << 20
"""Most bytes of float64 probabilities (pixels x classes x 8) scikit-learn computes in one call: with many classes
fewer pixels go at a time, so a call's temporaries (a forest: one such array per thread and their sum) stay bounded."""
LOGISTIC_COPIES = 4
"""Arrays of labelled pixels x classes float64 that fitting a logistic regression holds at once (its probabilities,
gradient and the solver's working copies), for check_training_size."""


def check_training_size(labels: list[np.ndarray], kind: str, trees: int, limit_gb: float) -> None:
    """Refuse a training whose trees would outgrow `limit_gb`, before any work: a tree holds up to one
    node per labelled pixel and one float64 per class in each node (boosting: a tree per class and
    iteration), so the size grows as classes x labelled pixels x trees. Logistic regression holds LOGISTIC_COPIES
    arrays of classes x labelled pixels."""
    values, counts = np.unique(np.concatenate([np.ravel(label) for label in labels]), return_counts=True)
    pixels, classes = int(counts[values != 0].sum()), int(np.count_nonzero(values))
    copies = LOGISTIC_COPIES if kind == "logistic" else trees or DEFAULT_TREES
    size = classes * pixels * copies * 8
    if size > limit_gb * (1 << 30):
        raise DinofeatError(f"training the {kind.replace('_', ' ')} classifier on {classes} classes x {pixels} labelled pixels x "
                            f"{copies} {'copies' if kind == 'logistic' else 'trees'} could take {size / (1 << 30):.1f} GiB, more than this server's "
                            f"limit of {limit_gb:g} GiB (max_training_gb); label fewer classes or pixels, or ask for fewer trees.")


def labelled_pixels(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature vectors (N, C) and class values (N,) of the labelled pixels of a (C, ...) stack."""
    mask = labels != 0
    return features[:, mask].T, labels[mask]


def forest_leaf(classes: np.ndarray) -> int:
    """The forest's smallest leaf, in labelled pixels, for training pixels of these class values."""
    rarest = int(np.unique(classes, return_counts=True)[1].min())
    return max(1, min(FOREST_MIN_LEAF, rarest // RAREST_CLASS_LEAVES))


def make_classifier(kind: str = DEFAULT_CLASSIFIER, trees: int = DEFAULT_TREES, seed: int = 0, *, threads: int = -1,
                    leaf: int = FOREST_MIN_LEAF) -> ClassifierMixin:
    """An untrained classifier of `kind` with balanced class weights; a forest grows leaves of at least `leaf`
    pixels and predicts on `threads` threads (-1: every core; the server passes its threads per worker)."""
    if kind in FORESTS:
        forest, drawn = FORESTS[kind]
        return forest(n_estimators=trees or DEFAULT_TREES, max_depth=FOREST_DEPTH, min_samples_leaf=leaf, max_features=drawn,
                      class_weight="balanced", n_jobs=threads, random_state=seed)
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000, random_state=seed))
    if kind == "gradient_boosting":
        return HistGradientBoostingClassifier(class_weight="balanced", random_state=seed)
    raise DinofeatError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)}.")


def train_classifier(samples: np.ndarray, classes: np.ndarray, kind: str = DEFAULT_CLASSIFIER, trees: int = DEFAULT_TREES,
                     seed: int = 0, *, threads: int = -1) -> ClassifierMixin:
    """Fit a classifier on labelled pixels (N, C) with their class values (N,) (a forest on `threads` threads)."""
    if len(np.unique(classes)) < 2:
        raise DinofeatError("the labels hold fewer than two classes; label at least two.")
    return make_classifier(kind, trees, seed, threads=threads, leaf=forest_leaf(classes)).fit(samples, classes)


def forest_limits(classifier: ClassifierMixin) -> dict:
    """The depth, leaf size and channels drawn per split a forest was grown with, for its metadata (nothing
    for other classifiers)."""
    if not isinstance(classifier, tuple(forest for forest, _ in FORESTS.values())):
        return {}
    return {"max_depth": classifier.max_depth, "min_samples_leaf": classifier.min_samples_leaf,
            "max_features": classifier.max_features}


def class_values(classifier: ClassifierMixin) -> list[int]:
    return [int(v) for v in classifier.classes_]


def prediction_pixels(classes: int) -> int:
    """Pixels predicted in one call for `classes` classes: their float64 probabilities fit PREDICTION_BYTES."""
    return max(1, min(PREDICTION_PIXELS, PREDICTION_BYTES // (8 * classes)))


def class_probabilities(classifier: ClassifierMixin, features: np.ndarray) -> np.ndarray:
    """Per-class probabilities (K, ...) float32 of every pixel of a (C, ...) feature stack, predicted a group of
    pixels at a time into the one float32 result (K x pixels x 4 bytes, plus PREDICTION_BYTES per call)."""
    flat = features.reshape(features.shape[0], -1).T
    classes = len(classifier.classes_)
    probabilities = np.empty((classes, len(flat)), np.float32)
    step = prediction_pixels(classes)
    for start in range(0, len(flat), step):
        probabilities[:, start : start + step] = classifier.predict_proba(flat[start : start + step]).T
    return probabilities.reshape(classes, *features.shape[1:])


def with_threads(classifier: ClassifierMixin, threads: int) -> ClassifierMixin:
    """`classifier` predicting on `threads` threads: a forest's n_jobs is the training server's, stored in
    its model file. A shallow copy (the trees are shared), so a model held for other requests is left as it is."""
    if "n_jobs" not in classifier.get_params(deep=False):
        return classifier
    return copy.copy(classifier).set_params(n_jobs=threads)
