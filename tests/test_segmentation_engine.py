"""Classifiers, model files, k-means, PCA pictures and few-shot ALP, checked on hand-made inputs and the ISB data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skops.io as sio
import tifffile
import torch
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.engine.stacks import CLASSICAL, intensity_scaled
from dinofeat_server.segment.classifiers import (
    CLASSIFIERS,
    class_probabilities,
    forest_leaf,
    forest_limits,
    labelled_pixels,
    train_classifier,
)
from dinofeat_server.segment.fewshot import (
    Shot,
    class_prototypes,
    fused_logit,
    most_confident_component,
    segment_query,
    standardise_by_support,
    to_grid,
    volume_support_slices,
)
from dinofeat_server.segment.model_file import (
    TrainedModel,
    model_bytes,
    model_from_bytes,
)
from dinofeat_server.segment.unsupervised import (
    attention_foreground,
    kmeans_labels,
    otsu_threshold,
    pca_picture,
)
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier


def half_and_half() -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 grid: left half foreground with feature (1, 0), right half background with (0, 1)."""
    features = torch.zeros(2, 8, 8)
    features[0, :, :4] = 1.0
    features[1, :, 4:] = 1.0
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1.0
    return features, mask


def test_alp_keeps_pure_windows_as_local_prototypes_plus_the_class_level_one():
    features, mask = half_and_half()
    prototypes = class_prototypes(features, mask, window=4)
    torch.testing.assert_close(prototypes, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))
    shifted = torch.zeros(8, 8)
    shifted[:, :2] = 1.0  # every 4x4 window is half foreground: no local prototype, class-level only
    torch.testing.assert_close(class_prototypes(features, shifted, window=4), torch.tensor([[1.0, 0.0]]))


def test_fused_logit_is_the_softmax_weighted_sum_of_scaled_cosines():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[[1.0, 1.0, 3.0]], [[0.0, 1.0, 1.0]]])  # three cells: along p0, diagonal, mostly p0
    logit = fused_logit(query, prototypes)
    for cell, (a, b) in enumerate([(1.0, 0.0), (1.0, 1.0), (3.0, 1.0)]):
        s = torch.tensor([20 * a / math.hypot(a, b), 20 * b / math.hypot(a, b)])
        assert logit[0, cell] == pytest.approx(float((s.softmax(0) * s).sum()), rel=1e-5)


def test_cca_keeps_the_component_with_the_highest_probability_mass():
    probability = np.zeros((20, 20), np.float32)
    probability[2:5, 2:5] = 0.99  # small and sure: mass 8.9
    probability[10:18, 10:18] = 0.6  # large and less sure: mass 38.4
    predicted = probability > 0.5
    kept = most_confident_component(probability, predicted)
    assert kept[12, 12] and not kept[3, 3] and kept.sum() == 64


def test_cca_joins_diagonal_neighbours():
    predicted = np.zeros((5, 5), bool)
    predicted[0, 0] = predicted[1, 1] = predicted[4, 4] = True
    kept = most_confident_component(predicted.astype(np.float32), predicted)
    assert kept[0, 0] and kept[1, 1] and not kept[4, 4]


def test_volume_protocol_splits_the_support_range_in_three_and_takes_middle_slices():
    support = np.zeros((50, 4, 4), bool)
    support[10:40, 1, 1] = True
    assert volume_support_slices(support, 9) == [15, 15, 15, 25, 25, 25, 35, 35, 35]


def test_few_shot_on_isb_halves_segments_the_grains(isb_three_phase):
    image = tifffile.imread(isb_three_phase / "image.tif")
    truth = tifffile.imread(isb_three_phase / "ground_truth.tif")
    features = torch.from_numpy(CLASSICAL.compute(intensity_scaled(image)))
    (support,), (query,) = standardise_by_support([features[:, :, :256]], [features[:, :, 256:]])
    scores = {}
    for value, connected in ((170, False), (85, True)):
        grid_features, share = to_grid(support, torch.from_numpy(truth[:, :256] == value), 4)
        grid_query, _ = to_grid(query, None, 4)
        _, predicted = segment_query(grid_query, [Shot(grid_features, share)], (512, 256), one_component=connected)
        expected = truth[:, 256:] == value
        scores[value] = 2 * (predicted & expected).sum() / (predicted.sum() + expected.sum())
    print("few-shot Dice", scores)
    # measured 0.949 (grains, all components) and 0.948 (matrix, most confident component):
    # the two large phases differ clearly in the classical features; 0.92 leaves room for platform noise
    assert scores[170] > 0.92 and scores[85] > 0.92


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_every_classifier_learns_two_separable_classes_in_the_users_values(kind):
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (3, 20, 10)), rng.normal(4, 1, (3, 20, 10))], axis=2).astype(np.float32)
    labels = np.zeros((20, 20), np.uint16)
    labels[::3, :10] = 700
    labels[::3, 10:] = 9
    model = train_classifier(*labelled_pixels(features, labels), kind=kind, trees=20)
    probabilities = class_probabilities(model, features)
    assert [int(v) for v in model.classes_] == [9, 700]
    prediction = np.array([9, 700])[probabilities.argmax(0)]
    assert (prediction[:, :10] == 700).mean() > 0.95 and (prediction[:, 10:] == 9).mean() > 0.95


def test_model_files_round_trip_to_identical_probabilities_and_refuse_other_features():
    rng = np.random.default_rng(1)
    samples, classes = rng.normal(size=(300, 5)), rng.integers(1, 4, 300)
    model = TrainedModel(train_classifier(samples, classes, trees=10), {"feature_set": "classical", "channels": 5})
    again = model_from_bytes(model_bytes(model))
    features = rng.normal(size=(5, 7, 9)).astype(np.float32)
    np.testing.assert_array_equal(class_probabilities(again.classifier, features), class_probabilities(model.classifier, features))
    with pytest.raises(DinofeatError, match="the model was trained on 'classical' features, not 'hybrid'; apply it with --set classical"):
        again.check_features("hybrid", 5)
    with pytest.raises(DinofeatError, match="expects 5 feature channels but this image gives 15"):
        again.check_features("classical", 15)


def old_model_file(feature_set: str) -> bytes:
    """A dinofeat-model/1 file as written before feature spaces existed."""
    import io
    import json
    import zipfile

    classifier = train_classifier(np.random.default_rng(2).normal(size=(50, 4)), np.arange(50) % 2 + 1, trees=3)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"format": "dinofeat-model/1", "feature_set": feature_set, "channels": 4}))
        archive.writestr("classifier.skops", sio.dumps(classifier))
    return buffer.getvalue()


def test_old_classical_model_files_still_load_with_the_fixed_classical_space():
    model = model_from_bytes(old_model_file("classical"))
    assert model.space() is None and model.metadata["channels"] == 4


def test_old_deep_model_files_are_refused_with_a_sentence_to_retrain():
    with pytest.raises(DinofeatError, match=r"^the model file \(dinofeat-model/1\) was trained on 'hybrid' features without "
                                            r"storing their feature space; train it again with this dinofeat\.$"):
        model_from_bytes(old_model_file("hybrid"))


def test_model_files_are_written_in_format_2_with_their_feature_space():
    import io
    import json
    import zipfile

    space = CLASSICAL.fitted_space([np.zeros((20, 20), np.uint16)])
    classifier = train_classifier(np.random.default_rng(3).normal(size=(40, 58)), np.arange(40) % 2 + 1, trees=3)
    data = model_bytes(TrainedModel(classifier, {"feature_set": "classical", "channels": 58, "feature_space": space.to_dict()}))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert json.loads(archive.read("metadata.json"))["format"] == "dinofeat-model/2"
    assert model_from_bytes(data).space().input_range == (0.0, 65535.0)


def test_model_files_with_untrusted_types_or_junk_are_refused():
    import fractions
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("metadata.json", '{"format": "dinofeat-model/1", "feature_set": "classical", "channels": 1}')
        archive.writestr("classifier.skops", sio.dumps({"f": fractions.Fraction(1, 3)}))
    with pytest.raises(DinofeatError, match="holds types dinofeat does not load"):
        model_from_bytes(buffer.getvalue())
    with pytest.raises(DinofeatError, match="this is not a dinofeat model file"):
        model_from_bytes(b"definitely not a zip")


def test_kmeans_gives_k_labels_and_is_deterministic_with_a_seed():
    rng = np.random.default_rng(2)
    features = torch.from_numpy(rng.normal(size=(6, 30, 40)).astype(np.float32))
    features[:, :, :20] += 3.0
    a, b = kmeans_labels(features, 3, seed=5), kmeans_labels(features, 3, seed=5)
    assert a.shape == (30, 40) and set(np.unique(a)) == {1, 2, 3}
    np.testing.assert_array_equal(a, b)


def test_pca_picture_is_rgb_uint8_of_the_image_size():
    features = torch.from_numpy(np.random.default_rng(3).normal(size=(10, 25, 35)).astype(np.float32))
    picture = pca_picture(features)
    assert picture.shape == (25, 35, 3) and picture.dtype == np.uint8 and picture.max() == 255


def test_attention_foreground_splits_a_bimodal_map_at_the_gap():
    attention = torch.full((2, 10, 10), 0.1)
    attention[:, 3:7, 3:7] = 0.9
    mask = attention_foreground(attention)
    assert mask.sum() == 16 and mask[5, 5]
    assert 0.1 < otsu_threshold(np.array([0.1] * 50 + [0.9] * 50)) < 0.9


def test_a_model_file_that_would_unpack_beyond_its_limit_is_refused_before_inflating():
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", b" " * (65 << 20))  # 65 MiB of spaces deflate to about 64 KB
        archive.writestr("classifier.skops", b"")
    assert len(buffer.getvalue()) < 1 << 20
    with pytest.raises(DinofeatError, match=r"^the model file's metadata.json would unpack to more than 64 MiB"):
        model_from_bytes(buffer.getvalue())


@pytest.mark.parametrize("metadata,message", [(b"[1, 2]", "metadata is not a JSON object"),
                                              (b"not json", "this is not a dinofeat model file, or it is damaged")])
def test_model_files_with_odd_metadata_get_one_sentence(metadata, message):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("metadata.json", metadata)
        archive.writestr("classifier.skops", b"")
    with pytest.raises(DinofeatError, match=message):
        model_from_bytes(buffer.getvalue())


def test_a_model_file_with_a_corrupt_deflate_stream_gets_one_sentence():
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", b'{"format": "dinofeat-model/2"}' * 100)
        archive.writestr("classifier.skops", b"x" * 1000)
    data = bytearray(buffer.getvalue())
    start = data.index(b"metadata.json") + len("metadata.json")
    data[start + 5 : start + 25] = b"\xff" * 20  # inside the deflated bytes
    with pytest.raises(DinofeatError, match="this is not a dinofeat model file, or it is damaged"):
        model_from_bytes(bytes(data))


def test_the_default_classifier_is_extremely_randomised_trees_drawing_thirty_percent_of_the_channels():
    samples, classes = np.random.default_rng(5).normal(size=(200, 53)), np.arange(200) % 2 + 1
    default, weka_like = train_classifier(samples, classes, trees=2), train_classifier(samples, classes, "random_forest", trees=2)
    assert isinstance(default, ExtraTreesClassifier) and isinstance(weka_like, RandomForestClassifier)
    assert forest_limits(default) == {"max_depth": 10, "min_samples_leaf": 5, "max_features": 0.3}
    assert forest_limits(weka_like)["max_features"] == "sqrt"
    assert forest_limits(train_classifier(samples, classes, "logistic")) == {}


def test_the_forest_keeps_leaves_of_five_pixels_unless_the_rarest_class_has_under_a_hundred():
    def classes(rarest: int) -> np.ndarray:
        return np.repeat([1, 2], [1000, rarest])

    assert [forest_leaf(classes(n)) for n in (300, 100, 99, 64, 40, 27, 5)] == [5, 5, 4, 3, 2, 1, 1]
    samples = np.random.default_rng(4).normal(size=(1300, 3))
    assert train_classifier(samples[:1027], classes(27), trees=2).min_samples_leaf == 1  # what the model file records
    assert train_classifier(samples, classes(300), trees=2).min_samples_leaf == 5
