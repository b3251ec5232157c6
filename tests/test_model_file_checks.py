"""Model files from anyone, and requests of many classes, against the server's memory and its compiled code.

A crafted model is a real small trained model whose skops member has one array or one schema number changed, as
an attacker would: each is refused in one sentence, or predicts without crashing (in a subprocess, so a
segmentation fault fails the test instead of ending the test run)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from conftest import ServerProcess
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.segment.classifiers import PREDICTION_BYTES, class_probabilities, make_classifier, train_classifier
from dinofeat_server.segment.model_file import TrainedModel, model_bytes, model_from_bytes
from dinofeat_server.service.checks import check_classes, check_probabilities
from dinofeat_server.service.config import ServerLimits

CHANNELS = 6
CLASS_VALUES = [10, 20, 30]
KINDS = ("extra_trees", "random_forest", "logistic", "gradient_boosting")
ONE_SENTENCE = r"^[^\n]+\.$"


def small_model(kind: str, class_values: list[int] = CLASS_VALUES) -> TrainedModel:
    """A real model of `kind` trained on random samples of CHANNELS channels (3 trees; boosting: 3 iterations)."""
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(240, CHANNELS)).astype(np.float32)
    classes = np.array(class_values)[np.arange(240) % len(class_values)]
    samples[:, 0] += classes / 10
    if kind == "gradient_boosting":
        classifier = make_classifier(kind).set_params(max_iter=3).fit(samples, classes)
    else:
        classifier = train_classifier(samples, classes, kind, trees=3, threads=1)
    return TrainedModel(classifier, {"feature_set": "classical", "channels": CHANNELS, "class_values": class_values})


def crafted(data: bytes, change_array: Callable[[str, np.ndarray], np.ndarray | None]) -> bytes:
    """The model file `data` with its classifier's .npy arrays passed through `change_array` (None: unchanged),
    written back as an attacker would."""
    with zipfile.ZipFile(io.BytesIO(data)) as outer:
        metadata, skops = outer.read("metadata.json"), outer.read("classifier.skops")
    members = {}
    with zipfile.ZipFile(io.BytesIO(skops)) as inner:
        for name in inner.namelist():
            members[name] = inner.read(name)
    for name, raw in members.items():
        if name.endswith(".npy"):
            changed = change_array(name, np.load(io.BytesIO(raw), allow_pickle=False))
            if changed is not None:
                buffer = io.BytesIO()
                np.save(buffer, changed, allow_pickle=False)
                members[name] = buffer.getvalue()
    return zipped({"metadata.json": metadata, "classifier.skops": zipped(members)})


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)
    return buffer.getvalue()


def node_field(field: str, value, node: int = 0) -> Callable[[str, np.ndarray], np.ndarray | None]:
    """A change of `field` of node `node` in the first node array (a Tree's or a gradient-boosting predictor's) that has it."""
    done = []

    def change(name: str, array: np.ndarray) -> np.ndarray | None:
        if done or array.dtype.names is None or field not in array.dtype.names:
            return None
        done.append(name)
        array = array.copy()
        array[field][node] = np.array(value).astype(array.dtype[field]) if np.isfinite(value) else value
        return array
    return change


def refusal(data: bytes) -> str | None:
    """The sentence refusing a model file, or None when it loads."""
    try:
        model_from_bytes(data)
    except DinofeatError as error:
        assert "\n" not in str(error) and str(error).endswith(".") and "Traceback" not in str(error), str(error)
        return str(error)
    return None


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {kind: model_bytes(small_model(kind)) for kind in KINDS}


ISSUE_ATTACKS = {
    "a child index of 2**40": ("random_forest", node_field("left_child", 2**40), "child index outside"),
    "a feature index of 2**30": ("extra_trees", node_field("feature", 2**30), "splits on a channel outside"),
    "a negative right child": ("extra_trees", node_field("right_child", -7), "child index outside"),
    "a child pointing back to the root": ("random_forest", node_field("left_child", 0), "child index outside"),
    "a NaN threshold": ("extra_trees", node_field("threshold", np.nan), "threshold that is not a finite number"),
    "a boosting feature_idx of 2**30": ("gradient_boosting", node_field("feature_idx", 2**30), "splits on a channel outside"),
    "a boosting child beyond the nodes": ("gradient_boosting", node_field("right", 2**31), "child index outside"),
    "a boosting categorical split": ("gradient_boosting", node_field("is_categorical", 1), "categorical split"),
}


@pytest.mark.parametrize("attack", ISSUE_ATTACKS)
def test_a_tree_node_patched_out_of_range_is_refused_in_one_sentence(models, attack):
    kind, change, reason = ISSUE_ATTACKS[attack]
    assert reason in refusal(crafted(models[kind], change))


def test_a_tree_claiming_more_nodes_than_it_holds_is_refused_before_its_arrays_are_read():
    from dinofeat_server.segment.classifier_checks import check_tree

    tree = small_model("extra_trees").classifier.estimators_[0].tree_
    state = tree.__getstate__()
    tree.__setstate__({**state, "nodes": state["nodes"].copy(), "values": state["values"].copy(), "node_count": 100000})
    with pytest.raises(DinofeatError, match=r"tree 0 claims 100000 nodes but holds \d+"):
        check_tree(tree, CHANNELS, 3, "tree 0")


def test_values_of_another_shape_and_logistic_arrays_of_other_sizes_are_refused(models):
    def wider(kind_of: str) -> Callable[[str, np.ndarray], np.ndarray | None]:
        def change(name: str, array: np.ndarray) -> np.ndarray | None:
            if np.issubdtype(array.dtype, np.floating) and array.ndim == (3 if kind_of == "values" else 2):
                return np.concatenate([array, array[..., :1]], axis=-1)
            return None
        return change
    assert "damaged" in refusal(crafted(models["random_forest"], wider("values")))
    assert "finite coefficients of 3 classes x 6 channels" in refusal(crafted(models["logistic"], wider("coef")))


def test_a_classifier_dinofeat_does_not_train_is_refused_in_one_sentence():
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(1).fit(np.eye(3), [1, 2, 3])
    data = model_bytes(TrainedModel(knn, {"feature_set": "classical", "channels": 3}))
    assert refusal(data).startswith("the model file holds a KNeighborsClassifier, not a classifier dinofeat trains")


@pytest.mark.parametrize("metadata,reason", [
    ({"channels": CHANNELS}, "has no 'feature_set'"),
    ({"feature_set": "classical", "channels": "six"}, "'channels' is not a JSON integer"),
    ({"feature_set": "classical", "channels": CHANNELS, "class_values": [10, 20, 31]}, "differ from the metadata's class_values"),
    ({"feature_set": "classical", "channels": 7}, "reads 6 channels but the metadata says 7"),
    ({"feature_set": "classical", "channels": CHANNELS, "feature_space": {"format": "x"}}, "not a dinofeat feature space"),
    ({"feature_set": "classical", "channels": CHANNELS, "options": [1]}, "'options' is not a JSON object"),
])
def test_bad_metadata_is_refused_in_one_sentence(metadata, reason):
    model = small_model("extra_trees")
    assert reason in refusal(model_bytes(TrainedModel(model.classifier, metadata)))


def test_metadata_nested_deeper_than_python_recurses_is_refused_in_one_sentence(models):
    with zipfile.ZipFile(io.BytesIO(models["logistic"])) as archive:
        skops = archive.read("classifier.skops")
    deep = b'{"format": "dinofeat-model/2", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert refusal(zipped({"metadata.json": deep, "classifier.skops": skops})).startswith("this is not a dinofeat model file")


def test_a_hidden_array_is_counted_at_its_size_in_memory_not_its_packed_size():
    model = small_model("extra_trees")
    plain = model_from_bytes(model_bytes(model)).unpacked_bytes
    model.classifier.padding_ = np.zeros(64 << 20, np.uint8)  # as an attacker's extra attribute
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", json.dumps({"format": "dinofeat-model/2", **model.metadata}))
        archive.writestr("classifier.skops", sio.dumps(model.classifier, compression=zipfile.ZIP_DEFLATED))
    assert len(buffer.getvalue()) < 1 << 20
    assert model_from_bytes(buffer.getvalue()).unpacked_bytes >= plain + (64 << 20)


def test_a_nested_member_declaring_more_than_the_classifiers_limit_is_refused(models):
    with zipfile.ZipFile(io.BytesIO(models["logistic"])) as archive:
        metadata, skops = archive.read("metadata.json"), bytearray(archive.read("classifier.skops"))
    entry = skops.index(b"PK\x01\x02")  # the first central directory entry: its uncompressed size at +24
    skops[entry + 24 : entry + 28] = (3 << 30).to_bytes(4, "little")
    assert "would unpack to more than 1024 MiB" in refusal(zipped({"metadata.json": metadata, "classifier.skops": bytes(skops)}))


BAD_INTEGERS = (2**40, 2**31, 2**30, -1, -2, -(2**40))
BAD_FLOATS = (np.nan, np.inf, -np.inf, 1e300)


def random_change(rng: np.random.Generator, kind_names: list[str]) -> Callable[[str, np.ndarray], np.ndarray | None]:
    """One random change to one random array of a model: a node field set out of range (or to its own index, the
    last node, the root), a float set to NaN or infinity, or an array one element wider."""
    target = kind_names[rng.integers(len(kind_names))]
    choice = rng.random()

    def change(name: str, array: np.ndarray) -> np.ndarray | None:
        if name != target:
            return None
        array = array.copy()
        if array.dtype.names:
            node = int(rng.integers(len(array)))
            field = array.dtype.names[rng.integers(len(array.dtype.names))]
            if np.issubdtype(array.dtype[field], np.floating):
                array[field][node] = BAD_FLOATS[rng.integers(len(BAD_FLOATS))]
            else:
                value = [*BAD_INTEGERS, node, len(array), len(array) - 1, 0][rng.integers(len(BAD_INTEGERS) + 4)]
                array[field][node] = np.array(value, np.int64).astype(array.dtype[field])
            return array
        if array.size and choice < 0.6:
            flat = array.reshape(-1)
            position = int(rng.integers(flat.size))
            flat[position] = BAD_FLOATS[rng.integers(2)] if np.issubdtype(array.dtype, np.floating) else \
                np.array(BAD_INTEGERS[rng.integers(len(BAD_INTEGERS))], np.int64).astype(array.dtype)
            return array
        return np.concatenate([array, array[..., :1]], axis=-1) if array.ndim else array
    return change


PREDICT_EACH = """
import sys
import numpy as np
from pathlib import Path
from dinofeat_server.segment.classifiers import class_probabilities
from dinofeat_server.segment.model_file import model_from_bytes
features = np.random.default_rng(0).normal(0, 3, (6, 40, 50)).astype(np.float32)
for path in sorted(Path(sys.argv[1]).glob("*.model")):
    print(path.name, flush=True)
    probabilities = class_probabilities(model_from_bytes(path.read_bytes()).classifier, features)
    assert probabilities.shape == (3, 40, 50), probabilities.shape
print("all predicted", flush=True)
"""


def test_crafted_trees_are_refused_in_one_sentence_or_predict_without_crashing(models, tmp_path):
    rng = np.random.default_rng(27)
    refused = accepted = 0
    for kind, data in models.items():
        with zipfile.ZipFile(io.BytesIO(data)) as outer, zipfile.ZipFile(io.BytesIO(outer.read("classifier.skops"))) as inner:
            arrays = [name for name in inner.namelist() if name.endswith(".npy")]
        for number in range(25):
            mutant = crafted(data, random_change(rng, arrays))
            if refusal(mutant) is None:
                (tmp_path / f"{kind}-{number:02d}.model").write_bytes(mutant)
                accepted += 1
            else:
                refused += 1
    run = subprocess.run([sys.executable, "-c", PREDICT_EACH, str(tmp_path)], capture_output=True, text=True, timeout=120)
    print(f"{refused} refused, {accepted} predicted")
    assert run.returncode == 0 and run.stdout.endswith("all predicted\n"), \
        f"exit {run.returncode} after {run.stdout.splitlines()[-1:]}: {run.stderr[-2000:]}"
    assert refused > 25 and accepted > 0


def test_a_crafted_model_applied_through_a_real_server_gets_one_sentence_and_the_server_still_answers(models, tmp_path):
    from dinofeat_client.client import FeatureClient

    path = tmp_path / "crafted.model"
    path.write_bytes(crafted(models["random_forest"], node_field("left_child", 2**40)))
    server = ServerProcess()
    try:
        client = FeatureClient(server.address)
        with pytest.raises(DinofeatError, match=ONE_SENTENCE) as refused:
            client.apply(path, np.zeros((32, 32), np.uint8), tmp_path / "out.tif")
        assert "child index outside" in str(refused.value)
        assert client.health().version and server.process.poll() is None
    finally:
        server.stop()


def test_more_classes_than_max_channels_are_refused_before_training():
    labels = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) % 101 + 1  # 101 classes of 2 or 3 pixels each
    with pytest.raises(DinofeatError, match=r"^101 classes would give 101 probability channels, more than this server's "
                                            r"limit of 100 \(max_channels\); label fewer classes\.$"):
        check_classes([labels], ServerLimits(max_channels=100))


def test_probabilities_beyond_max_output_gb_are_refused_before_work():
    limits = ServerLimits(max_output_gb=1.0)
    check_probabilities(4, np.zeros((8192, 8192), np.uint8), limits)  # exactly 1 GiB
    with pytest.raises(DinofeatError, match=r"^the probabilities of 5 classes for this image would take 1.2 GiB, more than "
                                            r"this server's limit of 1 GiB \(max_output_gb\)"):
        check_probabilities(5, np.zeros((8192, 8192), np.uint8), limits)


def test_segment_with_more_classes_than_the_servers_max_channels_gets_one_sentence(tmp_path):
    from conftest import InProcessServer

    server = InProcessServer(limits=ServerLimits(max_channels=100))
    try:
        labels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 101 + 1).astype(np.uint8)
        with pytest.raises(DinofeatError, match=r"^101 classes would give 101 probability channels"):
            server.client().segment(np.zeros((32, 32), np.uint8), labels, tmp_path / "out.tif")
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:The number of unique classes")
def test_prediction_of_a_thousand_classes_holds_the_result_and_a_bounded_number_of_bytes_more():
    rng = np.random.default_rng(4)
    classifier = train_classifier(rng.normal(size=(1024, 4)), np.arange(1, 1025), "extra_trees", trees=1, threads=1)
    features = rng.normal(size=(4, 128, 128)).astype(np.float32)
    result_bytes = 1024 * 128 * 128 * 4
    tracemalloc.start()
    try:
        probabilities = class_probabilities(classifier, features)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert probabilities.shape == (1024, 128, 128) and np.allclose(probabilities.sum(0), 1)
    print(f"peak {peak / 2**20:.0f} MiB for a result of {result_bytes / 2**20:.0f} MiB")
    assert peak < result_bytes + 3 * PREDICTION_BYTES  # before: float64 parts, their concatenation and copies, 5x the result
