"""One description of a feature computation, from the command line to the engine and back from every file.

The commands run by their own main() in this process against a real in-process server (conftest.run_cli,
inprocess_address), so each option's way from the parsed command to the engine is checked without spawning
processes."""

from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest
import tifffile
from conftest import run_cli
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat_client.cli import build_parser
from dinofeat.contract.computation import DEFAULT_SET, FeatureComputation, stored_computation
from dinofeat.contract.errors import DinofeatError
from dinofeat_client.spaces import read_stored


def one_sentence_refusal(result) -> str:
    """The single error line of a refused command (exit status 1, no traceback)."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinofeat: error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0].removeprefix("dinofeat: error: ")


@pytest.fixture()
def images(tmp_path):
    """Two 8-bit micrographs (a, b) and scribbles of a, as files."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[:96, :112]
    for name, shift in (("a", 0), ("b", 9)):
        picture = 80 + 60 * np.sin((y + shift) / 6) * np.cos(x / 9) + rng.normal(0, 8, y.shape)
        tifffile.imwrite(tmp_path / f"{name}.tif", np.clip(picture, 0, 255).astype(np.uint8))
    labels = np.zeros(y.shape, np.uint8)
    labels[10:14, 10:60], labels[70:74, 30:90] = 1, 2
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    return tmp_path


def test_a_computation_crosses_the_wire_unchanged():
    computation = FeatureComputation("dinov2", "dinov2_vits14_reg", "paper", 12, "zscore", "dataset", "ab" * 32)
    request = pb.ComputeFeaturesRequest(**computation.request_fields())
    assert FeatureComputation.from_proto(request.feature_set, request.options) == computation


def test_empty_fields_take_the_defaults_and_a_filter_bank_keeps_no_deep_fields():
    checked = FeatureComputation.from_proto("", pb.FeatureOptions()).checked()
    assert checked == FeatureComputation(DEFAULT_SET, input_range="dtype")
    assert FeatureComputation("multiscale", preset="paper").key() == FeatureComputation("multiscale").key()


@pytest.mark.parametrize("preset, rule", [("paper", "dtype"), ("paper_flips", "dtype"), ("default", "dataset"), ("fast", "dataset")])
def test_deep_presets_choose_their_input_range(preset, rule):
    assert FeatureComputation("dinov2", preset=preset).checked().input_range == rule


def test_every_command_of_the_classical_path_names_one_default_set():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("features", "segment", "train", "arff", "cluster", "pca", "demo"):
        action = next(a for a in commands[name]._actions if a.dest == "set")
        assert f"default {DEFAULT_SET}" in action.help and commands[name].get_default("default_set") == DEFAULT_SET
    fiji_train = commands["fiji"]._subparsers._group_actions[0].choices["train"]
    assert fiji_train.get_default("default_set") == DEFAULT_SET


def test_pca_of_a_filter_bank_is_refused_not_dropped(images, inprocess_address):
    result = run_cli("features", str(images / "a.tif"), "-o", str(images / "out.h5"), "--set", "classical", "--pca", "8",
                     "--server", inprocess_address)
    assert one_sentence_refusal(result) == ("--pca reduces the deep features of dinov2, attention, hybrid; the classical set "
                                            "is a filter bank without PCA: leave --pca out, or choose --set hybrid.")
    assert not (images / "out.h5").exists()


def test_a_deep_option_with_a_filter_bank_is_refused(images, inprocess_address):
    result = run_cli("segment", str(images / "a.tif"), "--labels", str(images / "labels.tif"), "-o", str(images / "s.tif"),
                     "--preset", "paper", "--server", inprocess_address)
    assert one_sentence_refusal(result).startswith("--preset applies to the deep sets (dinov2, attention, hybrid); the "
                                                   "multiscale set is a filter bank")


def test_hybrid_refuses_a_normalisation_it_cannot_apply():
    with pytest.raises(DinofeatError, match="the hybrid set always scales each channel"):
        FeatureComputation("hybrid", normalise="zscore").checked()


def test_features_like_a_model_adopt_its_computation(images, inprocess_address):
    trained = run_cli("train", str(images / "a.tif"), "--labels", str(images / "labels.tif"), "-o", str(images / "m.dfm"),
                      "--trees", "5", "--server", inprocess_address)
    assert trained.returncode == 0, trained.stderr
    adopted = run_cli("features", str(images / "b.tif"), "-o", str(images / "b.h5"), "--like", str(images / "m.dfm"),
                      "--server", inprocess_address)
    assert adopted.returncode == 0, adopted.stderr
    with h5py.File(images / "b.h5", "r") as f:
        assert f["features"].shape[0] == 53
        assert json.loads(f["features"].attrs["computation"])["feature_set"] == "multiscale"
    with zipfile.ZipFile(images / "m.dfm") as archive:
        assert json.loads(archive.read("metadata.json"))["computation"] == json.loads(f_attrs(images / "b.h5")["computation"])


def f_attrs(path) -> dict:
    with h5py.File(path, "r") as f:
        return dict(f["features"].attrs)


def test_a_conflicting_option_names_both_values_as_users_type_them(images, inprocess_address):
    made = run_cli("features", str(images / "a.tif"), "-o", str(images / "a.h5"), "--set", "ilastik", "--normalise", "zscore",
                   "--server", inprocess_address)
    assert made.returncode == 0, made.stderr
    result = run_cli("features", str(images / "b.tif"), "-o", str(images / "b.h5"), "--like", str(images / "a.h5"),
                     "--set", "classical", "--server", inprocess_address)
    assert one_sentence_refusal(result) == (f"--like {images / 'a.h5'} was computed with --set ilastik, but this command asks "
                                            "for classical; leave that option out to use the stored computation, or leave out "
                                            "the stored file to fit a new one.")


def test_a_zscore_space_is_adopted_with_its_normalisation(images, inprocess_address):
    run_cli("features", str(images / "a.tif"), "-o", str(images / "a.h5"), "--normalise", "zscore", "--server", inprocess_address)
    adopted = run_cli("features", str(images / "b.tif"), "-o", str(images / "b.h5"), "--like", str(images / "a.h5"),
                      "--server", inprocess_address)
    assert adopted.returncode == 0, adopted.stderr
    assert read_stored(images / "b.h5").computation == read_stored(images / "a.h5").computation
    assert read_stored(images / "b.h5").space_json == read_stored(images / "a.h5").space_json


def test_a_feature_file_of_an_earlier_dinofeat_is_adopted_from_its_spec(images, inprocess_address):
    run_cli("features", str(images / "a.tif"), "-o", str(images / "a.h5"), "--set", "classical", "--server", inprocess_address)
    with h5py.File(images / "a.h5", "r+") as f:
        del f["features"].attrs["computation"]  # as files of earlier versions were
        spec = json.loads(f["features"].attrs["feature_set"])
        spec.pop("input_range")
        f["features"].attrs["feature_set"] = json.dumps(spec)
    assert read_stored(images / "a.h5").computation == FeatureComputation("classical", input_range="dtype")
    adopted = run_cli("features", str(images / "b.tif"), "-o", str(images / "b.h5"), "--like", str(images / "a.h5"),
                      "--server", inprocess_address)
    assert adopted.returncode == 0, adopted.stderr
    assert f_attrs(images / "b.h5")["channel_names"].shape == (58,)


def test_an_earlier_deep_spec_is_read_with_the_input_range_it_was_computed_by():
    old = {"name": "hybrid", "backbone": "dinov2_vits14", "preset": "paper", "pca": 32, "normalisation": "minmax"}
    assert stored_computation(None, old) == FeatureComputation("hybrid", preset="paper", normalise="minmax", input_range="dataset")


def test_segment_on_the_client_uses_the_same_computation_as_the_command(images, inprocess_server, inprocess_address):
    command = run_cli("segment", str(images / "a.tif"), "--labels", str(images / "labels.tif"), "-o", str(images / "cli.tif"),
                      "--trees", "10", "--server", inprocess_address)
    assert command.returncode == 0, command.stderr
    with inprocess_server.client() as client:
        client.segment(tifffile.imread(images / "a.tif"), tifffile.imread(images / "labels.tif"), images / "api.tif", trees=10)
    np.testing.assert_array_equal(tifffile.imread(images / "cli.tif"), tifffile.imread(images / "api.tif"))


def test_the_paper_preset_through_the_command_line_divides_8_bit_by_255(images, inprocess_deep_server, inprocess_deep_address):
    result = run_cli("features", str(images / "a.tif"), "-o", str(images / "p.h5"), "--set", "dinov2", "--preset", "paper",
                     "--server", inprocess_deep_address, "--quiet")
    assert result.returncode == 0, result.stderr
    with inprocess_deep_server.client() as client:
        client.fetch_features(tifffile.imread(images / "a.tif"), images / "q.h5",
                              FeatureComputation("dinov2", preset="paper", input_range="dtype"))
    with h5py.File(images / "p.h5", "r") as p, h5py.File(images / "q.h5", "r") as q:
        assert json.loads(p["features"].attrs["computation"])["input_range"] == "dtype"
        np.testing.assert_array_equal(p["features"][()], q["features"][()])
        assert json.loads(p["feature_space"]["json"][()])["input_range"] == [0.0, 255.0]


def test_a_tws_classifiers_description_is_read_back_as_written(tmp_path):
    from dinofeat_client.fiji.tws import description_path

    computation = FeatureComputation("hybrid", preset="fast", pca=8, normalise="minmax", input_range="dataset")
    sidecar = description_path(tmp_path / "tws.model")
    sidecar.write_text(json.dumps({"computation": computation.to_dict(), "feature_space": {"format": "dinofeat-space/1"}}))
    assert sidecar.name == "tws.model.dinofeat.json"
    assert read_stored(sidecar).computation == computation
    sidecar.write_text("{}")
    with pytest.raises(DinofeatError, match="is not a dinofeat feature description"):
        read_stored(sidecar)


def test_an_ilastik_project_of_an_earlier_dinofeat_keeps_its_computation():
    from dinofeat_client.ilastik.provider import IlastikSpec

    old = IlastikSpec.from_dict({"feature_set": "hybrid", "backbone": "dinov2_vits14", "preset": "fast", "pca": 48,
                                 "quantise": "uint8"})
    assert old.computation == FeatureComputation("hybrid", preset="fast", pca=48, normalise="minmax", input_range="dataset")
    assert IlastikSpec.from_dict(old.to_dict()) == old
