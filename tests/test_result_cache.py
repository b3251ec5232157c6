"""The result cache: a repeated request streams the same bytes without recomputing, resumes work
from the cache, concurrent requests compute once, and the byte budget evicts the oldest."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest

from conftest import running_server
from dinofeat_client.client import FeatureClient
from dinofeat_server.engine.stacks import MULTISCALE
from dinofeat_server.service.result_cache import ResultCache, results_namespace


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cached_server(cache_folder) -> str:
    yield from running_server("--cache-dir", str(cache_folder), "--cache-gb", "0.05")


def stages_of(client: FeatureClient, image: np.ndarray, path) -> list[str]:
    seen = []
    client.fetch_features(image, path, progress=lambda stage, done, total: seen.append(stage))
    return seen


def test_a_repeated_request_is_served_from_the_cache_with_identical_bytes(cached_server, cache_folder, tmp_path):
    image = (np.random.default_rng(1).random((300, 260)) * 255).astype(np.uint8)
    with FeatureClient(cached_server) as client:
        first = stages_of(client, image, tmp_path / "a.h5")
        second = stages_of(client, image, tmp_path / "b.h5")
    assert "cached" not in first and "features" in first
    assert second[0] == "cached" and "features" not in second
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        for index in range(a["features"].id.get_num_chunks()):
            offset = a["features"].id.get_chunk_info(index).chunk_offset
            assert a["features"].id.read_direct_chunk(offset) == b["features"].id.read_direct_chunk(offset)
    assert len(list((cache_folder / results_namespace()).glob("*.stream"))) >= 1


def test_concurrent_requests_for_one_result_compute_it_once(cached_server, tmp_path):
    image = (np.random.default_rng(2).random((280, 270)) * 255).astype(np.uint8)
    stages: dict[int, list[str]] = {}

    def fetch(number: int) -> None:
        with FeatureClient(cached_server) as client:
            stages[number] = stages_of(client, image, tmp_path / f"c{number}.h5")

    threads = [threading.Thread(target=fetch, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    computed = [n for n, seen in stages.items() if "features" in seen]
    assert len(stages) == 3 and len(computed) == 1


def test_the_byte_budget_evicts_the_least_recently_used(cached_server, cache_folder, tmp_path):
    with FeatureClient(cached_server) as client:
        for seed in range(4):  # each result is ~20 MB of chunks; the budget is 50 MB
            image = (np.random.default_rng(10 + seed).random((400, 400)) * 255).astype(np.uint8)
            client.fetch_features(image, tmp_path / f"e{seed}.h5")
    entries = list((cache_folder / results_namespace()).glob("*.stream"))
    assert sum(p.stat().st_size for p in entries) <= 50_000_000
    assert len(entries) < 4  # some of the four were evicted
    assert not list(cache_folder.rglob("*.partial"))


def test_entries_sit_in_a_folder_named_for_this_dinofeat_and_its_feature_sets(tmp_path, monkeypatch):
    cache = ResultCache(tmp_path, 1 << 20)
    assert cache.folder == tmp_path / results_namespace() and cache.folder.is_dir()
    assert results_namespace().startswith("dinofeat-")
    before = results_namespace()
    monkeypatch.setitem(MULTISCALE.parameters, "dog_finest", 7)  # as an upgrade that changes a set's definition
    assert results_namespace() != before
    assert ResultCache(tmp_path, 1 << 20).folder != cache.folder  # an upgraded server never reads the older entries
