"""Deep features at any size in one feature space per dataset: tiles, the fitted space, --like, models."""

from __future__ import annotations

import json
import time

import h5py
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import ServerProcess, dinofeat
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat_client.spaces import read_space
from dinofeat_server.engine.deep import PRESETS, DeepExtractor
from dinofeat_server.engine.space import FeatureSpace
from dinofeat.contract.computation import FeatureComputation
from dinofeat_server.engine.stacks import FEATURE_SETS
from dinofeat_server.engine.tiles import TILE_OVERLAP, tile_plan
from dinofeat_server.engine.weights import file_sha256, load_backbone
from dinofeat_server.segment.classifiers import class_probabilities
from dinofeat_server.segment.model_file import model_from_bytes


def micrograph(seed: int, shape: tuple[int, int] = (200, 230)) -> np.ndarray:
    """Smooth blobs plus noise, uint8: structure the features can see, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(8, 30)
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    image = image / image.max() * 200 + rng.normal(0, 12, shape) + 20
    return np.clip(image, 0, 255).astype(np.uint8)


class TinyModels:
    """The tiny ViT as a server's model registry would hold it, with a chosen tile budget."""

    def __init__(self, weights, budget_bytes: int):
        self.path = weights
        self.deep = DeepExtractor(load_backbone(weights), torch.device("cpu"), budget_bytes)

    def extractor(self, backbone: str) -> DeepExtractor:
        return self.deep

    def weights_sha256(self, backbone: str) -> str:
        return file_sha256(self.path)


@pytest.mark.parametrize("name", ["dinov2", "hybrid"])
def test_a_deep_set_forced_into_many_tiles_matches_the_untiled_result(tiny_weights, name):
    image = micrograph(1, (300, 330))
    options = FeatureComputation(preset="default")
    whole_models, tiled_models = TinyModels(tiny_weights, 4 << 30), TinyModels(tiny_weights, 40 << 20)
    fset = FEATURE_SETS[name]
    space = fset.fitted_space([image], "cpu", options, whole_models)
    edge, _ = tiled_models.deep.plan(300, 330, PRESETS["default"], len(fset.deep_names(tiled_models, options)))
    tiles = tile_plan(300, 330, edge, align=7)
    assert len(tiles) >= 4
    whole = torch.from_numpy(fset.compute(image, "cpu", options, whole_models, space))
    tiled = torch.from_numpy(fset.compute(image, "cpu", options, tiled_models, space))
    assert whole.shape == tiled.shape
    assert fset.channel_names(1, options, whole_models) == fset.channel_names(1, options, tiled_models)
    cosine = F.cosine_similarity(whole, tiled, dim=0)
    seams = torch.zeros(300, 330, dtype=torch.bool)
    for tile in tiles:
        if tile.y0:
            seams[tile.y0 : tile.y0 + TILE_OVERLAP] = True
        if tile.x0:
            seams[:, tile.x0 : tile.x0 + TILE_OVERLAP] = True
    assert cosine.mean() >= 0.99
    assert cosine[seams].mean() >= 0.98


def test_the_fitted_space_leaves_the_tiles_in_k_channels_before_blending(tiny_weights):
    """PCA and scaling are affine: mapping each view's tokens equals mapping the finished raw features."""
    image = micrograph(2, (120, 150)).astype(np.float32) / 255
    models = TinyModels(tiny_weights, 4 << 30)
    options = FeatureComputation(preset="default", pca=6, normalise="minmax")
    space = FEATURE_SETS["dinov2"].fitted_space([image], "cpu", options, models)
    weight, bias = space.deep_affine()
    assert weight.shape == (6, 128)
    raw = models.deep.features(space.normalised_input(image), PRESETS["default"])
    mapped = torch.einsum("kc,chw->khw", weight, raw) + bias[:, None, None]
    torch.testing.assert_close(torch.from_numpy(FEATURE_SETS["dinov2"].compute(image, "cpu", options, models, space)),
                               mapped, rtol=1e-4, atol=1e-4)


def peak_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_peak_memory_depends_on_the_output_channels_not_on_the_whole_deep_stack(tiny_weights, tmp_path):
    """A 2048x2048 image's raw tiny-ViT stack (128 channels) is 2.1 GB, which the engine once held before
    PCA; now each view's tokens go to 16 channels and the server holds tiles and one band of rows."""
    server = ServerProcess("--weights", f"dinov2_vits14={tiny_weights}", "--memory-gb", "1.2", "--workers", "1")
    try:
        with FeatureClient(server.address) as client:
            client.fetch_features(micrograph(3, (64, 64)), tmp_path / "warm.h5", "dinov2", preset="fast", pca=16)
            base = peak_rss(server.process.pid)
            image = np.tile(micrograph(4, (256, 256)), (8, 8))
            client.fetch_features(image, tmp_path / "large.h5", "dinov2", preset="fast", pca=16)
            peak = peak_rss(server.process.pid)
    finally:
        server.stop()
    raw_stack = 128 * 2048 * 2048 * 4  # 2.1 GB; the output (16 channels) is an eighth of it
    with h5py.File(tmp_path / "large.h5", "r") as f:
        assert f["features"].shape == (16, 2048, 2048)
    # measured here: 0.28 GB; the engine before issue 12 held the whole raw stack
    assert peak - base < raw_stack / 4, f"the server grew by {(peak - base) / 1e9:.2f} GB"


@pytest.fixture(scope="module")
def two_images() -> tuple[np.ndarray, np.ndarray]:
    return micrograph(5), micrograph(6)


def test_train_on_one_image_and_apply_to_another_in_the_training_images_space(deep_server_address, two_images, tmp_path):
    a, b = two_images
    labels = np.zeros(a.shape, np.uint8)
    labels[a > 150], labels[a < 60] = 2, 1
    labels[1::3] = 0
    options = {"preset": "fast", "pca": 8}
    with FeatureClient(deep_server_address) as client:
        client.train([a], [labels], tmp_path / "m.dfm", "hybrid", trees=10, **options)
        client.fetch_features(a, tmp_path / "a.h5", "hybrid", **options)
        client.fetch_features(b, tmp_path / "b_like_model.h5", "hybrid", like=read_space(tmp_path / "m.dfm"), **options)
        client.fetch_features(b, tmp_path / "b_own.h5", "hybrid", **options)
        client.apply(tmp_path / "m.dfm", b, tmp_path / "b.tif", probabilities=tmp_path / "b_prob.h5")
    assert json.loads(read_space(tmp_path / "m.dfm")) == json.loads(read_space(tmp_path / "a.h5"))
    model = model_from_bytes((tmp_path / "m.dfm").read_bytes())
    with h5py.File(tmp_path / "b_like_model.h5", "r") as f, h5py.File(tmp_path / "b_prob.h5", "r") as p:
        np.testing.assert_allclose(p["probabilities"][()], class_probabilities(model.classifier, f["features"][()]), atol=1e-6)
    with h5py.File(tmp_path / "b_like_model.h5", "r") as like, h5py.File(tmp_path / "b_own.h5", "r") as own:
        assert not np.allclose(like["features"][:8], own["features"][:8], atol=1e-3)  # B's own space is another basis


def test_the_slices_of_a_volume_share_one_space(deep_server_address, two_images, tmp_path):
    a = two_images[0].astype(np.float32)
    with FeatureClient(deep_server_address) as client:
        client.fetch_features(np.stack([a, a / 2]), tmp_path / "v.h5", "hybrid", preset="fast", pca=4)
    with h5py.File(tmp_path / "v.h5", "r") as f:
        raw = f["features"][list(f["features"].attrs["channel_names"]).index("raw")]
        space = json.loads(f["feature_space"]["json"][()])
    assert raw[1].max() == pytest.approx(raw[0].max() / 2, rel=0.05)
    assert space["identity"]["image_channels"] == 1 and space["identity"]["feature_set"]["preset"] == "fast"


def test_a_space_of_other_features_is_refused_in_one_sentence(deep_server_address, two_images, tmp_path):
    a, b = two_images
    tifffile.imwrite(tmp_path / "a.tif", a)
    tifffile.imwrite(tmp_path / "b.tif", b)
    common = ["--set", "dinov2", "--pca", "4", "--server", deep_server_address]
    assert dinofeat("features", str(tmp_path / "a.tif"), "-o", str(tmp_path / "a.h5"), "--preset", "fast", *common).returncode == 0
    result = dinofeat("features", str(tmp_path / "b.tif"), "-o", str(tmp_path / "b.h5"), "--like", str(tmp_path / "a.h5"),
                      "--preset", "default", *common)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"dinofeat: error: --like {tmp_path / 'a.h5'} was computed with --preset fast, but this "
                                     "command asks for default; leave that option out to use the stored computation, or leave "
                                     "out the stored file to fit a new one.")
    assert not (tmp_path / "b.h5").exists()
    again = dinofeat("features", str(tmp_path / "b.tif"), "-o", str(tmp_path / "b.h5"), "--like", str(tmp_path / "a.h5"),
                     "--server", deep_server_address)  # the set, preset and PCA come from a.h5
    assert again.returncode == 0, again.stderr


def test_a_feature_file_without_a_space_still_reads_and_cannot_be_a_like(deep_server_address, two_images, tmp_path):
    with FeatureClient(deep_server_address) as client:
        client.fetch_features(two_images[0], tmp_path / "old.h5", "classical")
    with h5py.File(tmp_path / "old.h5", "r+") as f:
        del f["feature_space"]  # as files of earlier versions were
    with h5py.File(tmp_path / "old.h5", "r") as f:
        assert f["features"].shape == (58, 200, 230)
    with pytest.raises(DinofeatError, match=r"old.h5 holds no feature space \(written by an older dinofeat"):
        read_space(tmp_path / "old.h5")


def test_a_12_bit_image_in_uint16_gives_the_same_deep_features_as_the_same_image_at_16_bits(deep_server_address, tmp_path):
    twelve = (micrograph(7).astype(np.uint16) * 16).clip(0, 4095)
    with FeatureClient(deep_server_address) as client:
        client.fetch_features(twelve, tmp_path / "12.h5", "dinov2", preset="fast", pca=8)
        client.fetch_features(twelve * 16, tmp_path / "16.h5", "dinov2", preset="fast", pca=8)
    with h5py.File(tmp_path / "12.h5", "r") as f12, h5py.File(tmp_path / "16.h5", "r") as f16:
        np.testing.assert_allclose(f12["features"][()], f16["features"][()], atol=1e-3)
        assert f12["feature_space"].attrs["input_range"][1] > 3000


def test_a_result_beyond_the_servers_output_limit_is_refused_before_any_work(tiny_weights, tmp_path):
    server = ServerProcess("--weights", f"dinov2_vits14={tiny_weights}", "--max-output-gb", "0.01")
    try:
        started = time.monotonic()
        with FeatureClient(server.address) as client:
            with pytest.raises(DinofeatError, match=r"the dinov2 features of this image would take 0.1 GiB, more than this "
                                                    r"server's limit of 0.01 GiB \(max_output_gb\)"):
                client.fetch_features(micrograph(8, (256, 256)), tmp_path / "big.h5", "dinov2", preset="paper")
        assert time.monotonic() - started < 10
    finally:
        server.stop()
    assert not (tmp_path / "big.h5").exists()


def test_spaces_round_trip_through_json_exactly(tiny_weights):
    models = TinyModels(tiny_weights, 4 << 30)
    options = FeatureComputation(preset="fast", pca=5)
    space = FEATURE_SETS["hybrid"].fitted_space([micrograph(9)], "cpu", options, models)
    again = FeatureSpace.from_dict(json.loads(space.to_json()))
    assert again.to_json() == space.to_json()
    np.testing.assert_array_equal(again.components, space.components)
    assert again.components.shape == (5, 128) and again.shift.shape == (5 + 58,)


def test_a_client_that_goes_away_mid_image_stops_the_tile_loop(tiny_weights, tmp_path):
    import signal
    import subprocess
    import sys

    server = ServerProcess("--weights", f"dinov2_vits14={tiny_weights}", "--memory-gb", "1.05", "--workers", "1")
    tifffile.imwrite(tmp_path / "big.tif", np.tile(micrograph(10, (256, 256)), (12, 12)))  # 3072^2: hundreds of tiles
    try:
        client = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "features", "--server", server.address,
                                   str(tmp_path / "big.tif"), "-o", str(tmp_path / "big.h5"), "--set", "dinov2",
                                   "--preset", "default", "--quiet"])
        with FeatureClient(server.address) as other:
            deadline = time.monotonic() + 60
            while other.status().running != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(3)  # into the tiles
            client.send_signal(signal.SIGKILL)
            client.wait()
            killed = time.monotonic()
            while (other.status().running, other.status().cancelled) != (0, 1) and time.monotonic() < killed + 30:
                time.sleep(0.1)
            stopped_after = time.monotonic() - killed
            assert other.status().cancelled == 1
    finally:
        server.stop()
    assert stopped_after < 5, f"the tile loop went on for {stopped_after:.1f} s"  # one tile takes well under a second
    assert not (tmp_path / "big.h5").exists()


def test_apply_takes_weights_and_refuses_a_model_trained_with_other_weights(tiny_weights, two_images, tmp_path):
    from tiny_vit import save_official, tiny_model

    other = save_official(tiny_model(seed=1), tmp_path / "other.pth")
    a, b = two_images
    labels = np.zeros(a.shape, np.uint8)
    labels[a > 150], labels[a < 60] = 2, 1
    for name, array in (("a", a), ("b", b), ("labels", labels)):
        tifffile.imwrite(tmp_path / f"{name}.tif", array)
    trained = dinofeat("train", str(tmp_path / "a.tif"), "--labels", str(tmp_path / "labels.tif"), "-o", str(tmp_path / "m.dfm"),
                       "--set", "hybrid", "--preset", "fast", "--pca", "4", "--trees", "5", "--weights", str(tiny_weights),
                       "--device", "cpu", "--quiet")
    assert trained.returncode == 0, trained.stderr
    applied = dinofeat("apply", str(tmp_path / "m.dfm"), str(tmp_path / "b.tif"), "-o", str(tmp_path / "b_seg.tif"),
                       "--weights", str(tiny_weights), "--device", "cpu", "--quiet")
    assert applied.returncode == 0, applied.stderr
    refused = dinofeat("apply", str(tmp_path / "m.dfm"), str(tmp_path / "b.tif"), "-o", str(tmp_path / "b_other.tif"),
                       "--weights", str(other), "--device", "cpu", "--quiet")
    assert refused.returncode == 1
    assert "the features were described with dinov2_vits14 weights of sha256 " in refused.stderr
    assert "give the same weights file (--weights)" in refused.stderr
    assert not (tmp_path / "b_other.tif").exists()


def test_progress_counts_the_space_fit_then_tiles_and_views(deep_server_address, two_images, tmp_path):
    seen: dict[str, list[tuple[int, int]]] = {}
    with FeatureClient(deep_server_address) as client:
        client.fetch_features(two_images[0], tmp_path / "d.h5", "dinov2", preset="default", pca=4,
                              progress=lambda stage, done, total: seen.setdefault(stage, []).append((done, total)))
    fit = seen["fitting the feature space"]  # one sample crop covers this small image: its 9 views, one by one on a CPU
    assert fit[0] == (0, 9) and fit[-1] == (9, 9) and len({done for done, _ in fit}) == 10
    assert seen["tiles"][0] == (0, 1) and seen["tiles"][-1] == (1, 1)
    views = seen["views"]
    assert views[0] == (0, 9) and views[-1] == (9, 9) and [done for done, _ in views] == sorted(done for done, _ in views)
    assert len({done for done, _ in views}) == 10
    assert list(seen).index("fitting the feature space") < list(seen).index("views")


def test_the_blender_releases_each_chunk_once_as_soon_as_no_later_tile_touches_it():
    from dinofeat_server.engine.tiles import TileBlender, tile_rows

    rows = tile_rows(tile_plan(1000, 1200, 600, align=7))  # tiles start at x 0, 300, 600 and y 0, 399
    blender = TileBlender(2, 1000, 1200, 256)
    released, after_first_tile = [], None
    for number, row in enumerate(rows):
        until_row = rows[number + 1][0].y0 if number + 1 < len(rows) else 1000
        for place, tile in enumerate(row):
            blender.add(tile, torch.full((2, tile.height, tile.width), float(number + place)))
            released += list(blender.finished(until_row, row[place + 1].x0 if place + 1 < len(row) else 1200))
            after_first_tile = len(released) if after_first_tile is None else after_first_tile
    assert after_first_tile == 1 and released[0][:2] == (0, 0)  # the first chunk leaves after the first tile
    covered = torch.zeros(1000, 1200, dtype=torch.int32)
    for y0, x0, block in released:
        assert y0 % 256 == 0 and x0 % 256 == 0
        covered[y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] += 1
    assert (covered == 1).all() and not blender.cells
