"""Checks of a classifier loaded from a model file anyone may have written, before it predicts anything.

scikit-learn's compiled prediction code trusts its arrays: a tree node whose child index or feature index
lies outside its arrays reads (or, for categorical bitsets, writes) outside them, and the server dies with a
segmentation fault. So a classifier from a file is refused in one sentence unless it is exactly one of the
kinds dinofeat trains (segment/classifiers.py) and every array its prediction reads is in range:

- forests (extra trees, random forest): each scikit-learn `Tree` has 1 <= node_count == capacity, one output
  of the model's classes; a split node's children both lie after it and inside the tree (so every walk ends
  at a leaf) and its feature is one of the model's channels, its threshold finite; a leaf has both children
  -1; values are finite;
- histogram gradient boosting: the same for each `TreePredictor`'s nodes (no categorical splits, which
  dinofeat never trains), one predictor per class and iteration (one for two classes), a finite baseline;
- logistic regression: a StandardScaler and a LogisticRegression whose arrays have the model's channels and
  classes;
- all: integer class values, ascending, those of the metadata, and the metadata's channel count.

`held_bytes` measures what a loaded classifier holds in memory (arrays, tree nodes, Python objects), so a
file that deflates a large array into a few bytes is counted at its real size.
"""

from __future__ import annotations

import sys

import numpy as np
from dinofeat.contract.errors import DinofeatError
from sklearn._loss.link import LogitLink, MultinomialLogit
from sklearn._loss.loss import HalfBinomialLoss, HalfMultinomialLoss
from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.ensemble._hist_gradient_boosting.binning import _BinMapper
from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, ExtraTreeClassifier
from sklearn.tree._tree import NODE_DTYPE, Tree

MAX_TREES = 5000
"""Most trees of a forest (the server's limit on `trees` at training)."""


def refuse(what: str) -> DinofeatError:
    """The one sentence for a classifier that is not as dinofeat writes it."""
    return DinofeatError(f"the model file's classifier is damaged or altered ({what}); only models written by dinofeat "
                         "are accepted, so train the model again.")


def check_classifier(classifier: object, channels: int, class_values: list[int] | None) -> None:
    """Refuse a classifier that is not one dinofeat trains, or whose arrays prediction would read out of range.
    `channels` is the metadata's feature channel count; `class_values` the metadata's classes (None: not stored)."""
    _, check = CHECKS.get(type(classifier), (None, None))
    if check is None:
        raise DinofeatError(f"the model file holds a {type(classifier).__name__}, not a classifier dinofeat trains "
                            "(extra trees, random forest, logistic regression, gradient boosting); train one with `dinofeat train`.")
    try:
        classes = checked_classes(classifier, class_values)
        if getattr(classifier, "n_features_in_", None) != channels:
            raise refuse(f"it reads {getattr(classifier, 'n_features_in_', None)} channels but the metadata says {channels}")
        check(classifier, channels, len(classes))
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):  # a part missing or of another type
        raise refuse("a part of it is missing or of another kind") from None


def checked_classes(classifier: object, class_values: list[int] | None) -> np.ndarray:
    """The classifier's class values: 1-D integers, ascending, at least two, those of the metadata if stored."""
    classes = getattr(classifier, "classes_", None)
    if not (isinstance(classes, np.ndarray) and classes.ndim == 1 and np.issubdtype(classes.dtype, np.integer)
            and len(classes) >= 2 and np.all(np.diff(classes.astype(np.int64)) > 0)):
        raise refuse("its class values are not two or more ascending integers")
    if class_values is not None and [int(v) for v in classes] != class_values:
        raise refuse("its classes differ from the metadata's class_values")
    return classes


def check_nodes(leaf: np.ndarray, left: np.ndarray, right: np.ndarray, feature: np.ndarray, threshold: np.ndarray,
                channels: int, where: str) -> None:
    """Refuse a tree whose walk could leave its nodes: every split node's children lie after it and inside the
    tree (the walk ends at a leaf), its feature is one of `channels`, its threshold finite."""
    count = len(leaf)
    index = np.arange(count)
    split = ~leaf
    left, right, feature = (a.astype(np.int64)[split] for a in (left, right, feature))
    after = index[split]
    if not np.all((left > after) & (left < count) & (right > after) & (right < count)):
        raise refuse(f"{where} has a child index outside its {count} nodes")
    if not np.all((feature >= 0) & (feature < channels)):
        raise refuse(f"{where} splits on a channel outside the model's {channels}")
    if not np.all(np.isfinite(threshold[split])):
        raise refuse(f"{where} has a threshold that is not a finite number")


def check_tree(tree: object, channels: int, classes: int, where: str) -> None:
    """A scikit-learn Tree of one output and `classes` classes whose nodes stay inside it (node_count is
    checked against the allocated capacity before any array is read)."""
    if type(tree) is not Tree:
        raise refuse(f"{where} is a {type(tree).__name__}, not a decision tree")
    if tree.n_outputs != 1 or tree.max_n_classes != classes or list(tree.n_classes) != [classes]:
        raise refuse(f"{where} predicts {tree.max_n_classes} classes, not the model's {classes}")
    if not 1 <= tree.node_count == tree.capacity:
        raise refuse(f"{where} claims {tree.node_count} nodes but holds {tree.capacity}")
    left, right = tree.children_left, tree.children_right
    leaf = left == -1
    if np.any(right[leaf] != -1):
        raise refuse(f"{where} has a leaf with one child")
    check_nodes(leaf, left, right, tree.feature, tree.threshold, channels, where)
    if tree.value.shape != (tree.node_count, 1, classes) or not np.all(np.isfinite(tree.value)):
        raise refuse(f"{where} has values that are not finite numbers of its {classes} classes")


FOREST_TREES = {ExtraTreesClassifier: ExtraTreeClassifier, RandomForestClassifier: DecisionTreeClassifier}
"""The tree estimator each forest grows."""


def check_forest(forest: ExtraTreesClassifier | RandomForestClassifier, channels: int, classes: int) -> None:
    trees = forest.estimators_ if isinstance(getattr(forest, "estimators_", None), list) else None
    if not trees or len(trees) > MAX_TREES or forest.n_estimators != len(trees):
        raise refuse(f"the forest does not hold between 1 and {MAX_TREES} trees as it says")
    if forest.n_outputs_ != 1 or forest.n_classes_ != classes:
        raise refuse(f"the forest predicts {forest.n_classes_} classes of {forest.n_outputs_} outputs, not {classes} of one")
    for number, estimator in enumerate(trees):
        where = f"tree {number}"
        if type(estimator) is not FOREST_TREES[type(forest)]:
            raise refuse(f"{where} is a {type(estimator).__name__}")
        if estimator.n_outputs_ != 1 or estimator.n_classes_ != classes:
            raise refuse(f"{where} predicts {estimator.n_classes_} classes, not the model's {classes}")
        check_tree(estimator.tree_, channels, classes, where)


def check_predictor(predictor: object, channels: int, where: str) -> None:
    """A gradient-boosting TreePredictor whose nodes stay inside it, without categorical splits."""
    nodes = getattr(predictor, "nodes", None) if type(predictor) is TreePredictor else None
    if not (isinstance(nodes, np.ndarray) and nodes.dtype == PREDICTOR_RECORD_DTYPE and nodes.ndim == 1 and len(nodes) >= 1):
        raise refuse(f"{where} is not a tree of gradient-boosting nodes")
    bitsets = predictor.raw_left_cat_bitsets
    if not (isinstance(bitsets, np.ndarray) and bitsets.dtype == np.uint32 and bitsets.ndim == 2 and bitsets.shape[1] == 8):
        raise refuse(f"{where} has malformed category bitsets")
    if np.any(nodes["is_categorical"]):
        raise refuse(f"{where} has a categorical split, which dinofeat never trains")
    leaf = nodes["is_leaf"] != 0
    check_nodes(leaf, nodes["left"], nodes["right"], nodes["feature_idx"], nodes["num_threshold"], channels, where)
    if not np.all(np.isfinite(nodes["value"][leaf])):
        raise refuse(f"{where} has a leaf value that is not a finite number")


def check_boosting(model: HistGradientBoostingClassifier, channels: int, classes: int) -> None:
    """Raw features, no categories, the loss of `classes` classes, one predictor per class (one for two) per iteration."""
    per_iteration = 1 if classes == 2 else classes
    loss, link = (HalfBinomialLoss, LogitLink) if classes == 2 else (HalfMultinomialLoss, MultinomialLogit)
    if getattr(model, "_in_fit", False) or model._preprocessor is not None or model.is_categorical_ is not None:
        raise refuse("the gradient boosting expects preprocessed or categorical features")
    mapper = model._bin_mapper
    if type(mapper) is not _BinMapper or not isinstance(mapper.is_categorical_, np.ndarray) \
            or mapper.is_categorical_.shape != (channels,) or np.any(mapper.is_categorical_):
        raise refuse("the gradient boosting's binning is not that of its channels")
    if type(model._loss) is not loss or type(model._loss.link) is not link or model.n_trees_per_iteration_ != per_iteration:
        raise refuse(f"the gradient boosting's loss is not that of {classes} classes")
    baseline = model._baseline_prediction
    if not (isinstance(baseline, np.ndarray) and baseline.shape == (1, per_iteration) and baseline.dtype == np.float64
            and np.all(np.isfinite(baseline))):
        raise refuse("the gradient boosting's baseline is not one finite number per tree of an iteration")
    iterations = model._predictors
    if not isinstance(iterations, list) or not iterations:
        raise refuse("the gradient boosting holds no trees")
    for number, predictors in enumerate(iterations):
        if not isinstance(predictors, list) or len(predictors) != per_iteration:
            raise refuse(f"iteration {number} does not hold {per_iteration} trees")
        for k, predictor in enumerate(predictors):
            check_predictor(predictor, channels, f"tree {k} of iteration {number}")


def finite_array(value: object, shape: tuple[int, ...]) -> bool:
    return (isinstance(value, np.ndarray) and value.shape == shape and np.issubdtype(value.dtype, np.floating)
            and bool(np.all(np.isfinite(value))))


def check_logistic(pipeline: Pipeline, channels: int, classes: int) -> None:
    """make_classifier's pipeline: a StandardScaler of `channels` channels, then a LogisticRegression of
    `classes` classes (one row of coefficients for two)."""
    steps = pipeline.steps
    if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, tuple) and len(s) == 2 for s in steps)
            and type(steps[0][1]) is StandardScaler and type(steps[1][1]) is LogisticRegression):
        raise DinofeatError("the model file's pipeline is not dinofeat's logistic regression (a StandardScaler, then a "
                            "LogisticRegression); train one with `dinofeat train`.")
    if pipeline.memory is not None or getattr(pipeline, "transform_input", None) is not None:
        raise refuse("the pipeline caches or routes its input")
    scaler, logistic = steps[0][1], steps[1][1]
    if not (scaler.with_mean is True and scaler.with_std is True and scaler.n_features_in_ == channels
            and finite_array(scaler.mean_, (channels,)) and finite_array(scaler.scale_, (channels,))):
        raise refuse(f"the scaler does not hold finite means and scales of {channels} channels")
    rows = 1 if classes == 2 else classes
    if not (logistic.n_features_in_ == channels and finite_array(logistic.coef_, (rows, channels))
            and finite_array(logistic.intercept_, (rows,))):
        raise refuse(f"the logistic regression does not hold finite coefficients of {classes} classes x {channels} channels")


CHECKS = {ExtraTreesClassifier: ("extra_trees", check_forest), RandomForestClassifier: ("random_forest", check_forest),
          HistGradientBoostingClassifier: ("gradient_boosting", check_boosting), Pipeline: ("logistic", check_logistic)}
"""The classifier types dinofeat trains (segment/classifiers.py): the kind's name and the check of each."""


def classifier_kind(classifier: object) -> str:
    """The kind of a checked classifier, as segment/classifiers.py names it."""
    return CHECKS[type(classifier)][0]


def held_bytes(classifier: object) -> int:
    """Bytes a loaded classifier holds: every array's buffer, every Tree's nodes and values (allocated by
    scikit-learn, not visible as arrays) and the Python objects around them, each object counted once."""
    seen, pending, total = set(), [classifier], 0
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            total += item.nbytes + 112
            if item.dtype == object:
                pending.extend(item.ravel())
            continue
        total += sys.getsizeof(item)
        if isinstance(item, Tree):
            total += item.capacity * (NODE_DTYPE.itemsize + 8 * item.n_outputs * item.max_n_classes)
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            pending.extend(item)
        elif hasattr(item, "__dict__"):
            pending.append(vars(item))
    return total
