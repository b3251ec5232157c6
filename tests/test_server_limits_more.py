"""The next layer of a lab server's limits, one attack per test: a stalled weights download does not freeze the
server, only the backbones it offers load and loaded ones stay within their memory budget, a damaged cache entry is
computed again, token files fail closed and short tokens are refused, proxies never carry a loopback call,
every bad feature space is one sentence, and a local server's shutdown leaves its successor's socket alone."""

from __future__ import annotations

import asyncio
import base64
import gc
import http.server
import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest
import torch
from conftest import InProcessServer, ServerProcess, noise
from dinofeat.v1 import feature_service_pb2 as pb
from dinofeat.v1 import feature_service_pb2_grpc as pb_grpc
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat_client.spaces import read_space
from dinofeat.contract.tokens import read_named_tokens
from dinofeat_server.engine.weights import BACKBONES
from dinofeat_server.service.config import ServerLimits, read_config, serve_settings
from dinofeat_server.service.device_pool import DevicePool
from dinofeat_server.service.local_server import IdleWatch, start_local, stop_local
from dinofeat_server.engine.models import ModelRegistry, model_bytes
from dinofeat_server.service.result_cache import results_namespace
from dinofeat_server.service.security import TokenAuthentication
from dinofeat_server.service.server import reload_tokens

GOOD_TOKEN = "alice-token-0123456789"


class StallingWeightsServer(http.server.ThreadingHTTPServer):
    """A real http server on loopback that accepts a download and sends nothing until `release` is set."""

    def __init__(self):
        self.asked, self.release = threading.Event(), threading.Event()
        stalling = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                stalling.asked.set()
                stalling.release.wait(60)
                self.close_connection = True  # closes without an answer: the download fails at once

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


def seconds_taken(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_status_is_answered_within_a_second_while_a_weights_download_stalls(tmp_path, monkeypatch):
    stalling = StallingWeightsServer()
    monkeypatch.setenv("DINOFEAT_WEIGHTS_URL", stalling.url)
    monkeypatch.setenv("DINOFEAT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("DINOFEAT_WEIGHTS", raising=False)
    server = ServerProcess("--workers", "2")
    failures: list[str] = []

    def deep_request() -> None:
        with FeatureClient(server.address, retries=0) as client:
            try:
                client.fetch_features(noise(1, 64), tmp_path / "deep.h5", "dinov2")
            except DinofeatError as error:
                failures.append(str(error))

    deep = threading.Thread(target=deep_request)
    try:
        deep.start()
        assert stalling.asked.wait(60), "the server never asked for the weights"
        with FeatureClient(server.address) as other:
            assert seconds_taken(other.status) < 1.0
            assert seconds_taken(other.health) < 1.0
            assert "dinov2_vits14" not in other.status().loaded_models
            assert seconds_taken(lambda: other.fetch_features(noise(2, 64), tmp_path / "classical.h5")) < 10.0
    finally:
        stalling.close()
        deep.join(60)
        server.stop()
    assert len(failures) == 1 and failures[0].startswith(f"cannot download {stalling.url}/dinov2_vits14/"), failures


def test_a_backbone_the_server_does_not_offer_is_refused_in_one_sentence(tiny_weights, tmp_path):
    server = InProcessServer(weights={"*": str(tiny_weights)}, limits=ServerLimits(workers=1, backbones=("dinov2_vits14",)))
    try:
        with server.client() as client:
            with pytest.raises(DinofeatError) as refused:
                client.fetch_features(noise(3, 64), tmp_path / "b.h5", "dinov2", backbone="dinov2_vitb14")
            assert client.status().loaded_models == []
    finally:
        server.stop()
    assert str(refused.value) == ("this server does not offer the backbone 'dinov2_vitb14'; choose one of dinov2_vits14 "
                                  "(the server's backbones setting).")


def test_the_backbones_are_a_list_in_the_config_file_and_names_separated_by_commas_as_a_flag(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text('[limits]\nbackbones = ["dinov2_vits14", "dinov2_vitb14_reg"]\nbackbones_gb = 2.5\n')
    _, limits = read_config(path)
    assert (limits.backbones, limits.backbones_gb) == (("dinov2_vits14", "dinov2_vitb14_reg"), 2.5)
    assert serve_settings(path, {}, {"backbones": "dinov2_vitl14, dinov2_vits14"})[1].backbones == ("dinov2_vitl14", "dinov2_vits14")
    assert ServerLimits().backbones == BACKBONES  # every DINOv2 and DINOv3 backbone by default
    with pytest.raises(DinofeatError, match=r"^the limit backbones lists 'vit_huge', which is no backbone dinofeat knows; choose from "):
        ServerLimits(backbones="dinov2_vits14,vit_huge")


def test_loaded_backbones_beyond_the_memory_budget_go_least_recently_used_first_but_never_while_in_use(tiny_weights):
    registry = ModelRegistry(torch.device("cpu"), {"*": str(tiny_weights)})
    one_model = model_bytes(registry.extractor("dinov2_vits14"))
    registry = ModelRegistry(torch.device("cpu"), {"*": str(tiny_weights)}, memory_bytes=int(1.5 * one_model))
    pool = DevicePool([registry], workers=2)
    first, second = pool.models(pool.devices[0]), pool.models(pool.devices[0])
    try:
        first.extractor("dinov2_vits14")
        second.extractor("dinov2_vitb14")
        assert registry.loaded() == ["dinov2_vitb14", "dinov2_vits14"]  # over budget: the older one is in use
        first.release()
        assert registry.loaded() == ["dinov2_vitb14"]
        second.release()
        registry.extractor("dinov2_vits14")
        assert registry.loaded() == ["dinov2_vits14"] and registry.loaded_bytes() <= 1.5 * one_model
    finally:
        pool.close()


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_a_damaged_result_cache_entry_is_removed_and_computed_again(tmp_path, damage):
    server = InProcessServer(cache_dir=str(tmp_path / "cache"), cache_gb=0.05)
    image = noise(4, 200)
    try:
        with server.client() as client:
            client.fetch_features(image, tmp_path / "first.h5")
            [entry] = (tmp_path / "cache" / results_namespace()).glob("*.stream")
            data = bytearray(entry.read_bytes())
            if damage == "truncated":
                del data[len(data) // 2:]
            else:
                data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
            entry.write_bytes(bytes(data))
            stages: list[str] = []
            client.fetch_features(image, tmp_path / "again.h5", progress=lambda stage, done, total: stages.append(stage))
            cached: list[str] = []
            client.fetch_features(image, tmp_path / "cached.h5", progress=lambda stage, done, total: cached.append(stage))
    finally:
        server.stop()
    assert "cached" not in stages and cached[0] == "cached"
    with h5py.File(tmp_path / "first.h5") as first, h5py.File(tmp_path / "again.h5") as again:
        np.testing.assert_array_equal(first["features"][:], again["features"][:])


def token_server(tmp_path: Path, text: str) -> tuple[Path, TokenAuthentication]:
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    return path, TokenAuthentication(path)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.mark.parametrize("broken", ["a malformed line", "an emptied file", "a deleted file", "a short token"])
def test_a_token_file_that_fails_to_parse_on_reload_refuses_every_token_until_fixed(tmp_path, caplog, broken):
    path, authentication = token_server(tmp_path, f"alice {GOOD_TOKEN}\n")
    assert authentication.client(bearer(GOOD_TOKEN)) == "alice"
    if broken == "a deleted file":
        path.unlink()
    else:
        path.write_text({"a malformed line": f"alice {GOOD_TOKEN} extra\n", "an emptied file": "",
                         "a short token": f"alice {GOOD_TOKEN}\nbob short\n"}[broken])
    with caplog.at_level(logging.CRITICAL, logger="dinofeat.server"):
        reload_tokens(authentication)
    assert authentication.client(bearer(GOOD_TOKEN)) is None
    [record] = caplog.records
    assert record.levelno == logging.CRITICAL and "REFUSING EVERY TOKEN until" in record.getMessage()
    assert GOOD_TOKEN not in record.getMessage()
    path.write_text(f"alice {GOOD_TOKEN}\n")
    reload_tokens(authentication)
    assert authentication.client(bearer(GOOD_TOKEN)) == "alice"


@pytest.mark.parametrize("line", ["x", "alice", "alice short-token"])
def test_a_token_shorter_than_16_characters_is_refused_at_load_in_one_sentence(tmp_path, line):
    path = tmp_path / "tokens.txt"
    path.write_text(f"# lab\n{line}\n")
    with pytest.raises(DinofeatError) as refused:
        read_named_tokens(path)
    token = line.split()[-1]
    assert str(refused.value) == (f"line 2 of the token file {path} holds a token of {len(token)} characters, fewer than the 16 "
                                  "a token needs; make one with: python -c 'import secrets; print(secrets.token_hex(16))'")


def test_a_proxy_never_carries_a_call_to_a_loopback_server(inprocess_server, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as dead_proxy:  # accepts connections and never answers them
        proxy = f"http://127.0.0.1:{dead_proxy.getsockname()[1]}"
        for variable in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            monkeypatch.setenv(variable, proxy)
        for variable in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
            monkeypatch.delenv(variable, raising=False)
        port = inprocess_server.address.rsplit(":", 1)[1]
        for address in (inprocess_server.address, f"localhost:{port}"):
            with FeatureClient(address, connect_timeout_s=5, retries=0) as client:
                assert client.health().version


@pytest.fixture(scope="module")
def real_space(inprocess_server, tmp_path_factory) -> tuple[dict, int]:
    """The feature space of a stack of the default set, as --like sends it, and the stack's channel count."""
    path = tmp_path_factory.mktemp("space") / "features.h5"
    with inprocess_server.client() as client:
        client.fetch_features(noise(5, 64), path)
    with h5py.File(path) as features:
        channels = features["features"].shape[0]
    return json.loads(read_space(path)), channels


def refusal_of_space(server: InProcessServer, like: str, tmp_path: Path) -> str:
    with server.client() as client, pytest.raises(DinofeatError) as refused:
        client.fetch_features(noise(6, 64), tmp_path / "like.h5", like=like)
    return str(refused.value)


def float32_array(values: list[float]) -> dict:
    array = np.asarray(values, dtype="<f4")
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def test_a_feature_space_nested_100000_deep_is_refused_in_one_sentence(inprocess_server, tmp_path):
    refusal = refusal_of_space(inprocess_server, "[" * 100_000 + "]" * 100_000, tmp_path)
    assert refusal.startswith("the requested feature space has about 100000 JSON values") and refusal.count(". ") == 0


@pytest.mark.parametrize("scales", ["shift and scale differ", "both short"])
def test_feature_space_arrays_of_the_wrong_length_are_refused_in_one_sentence(inprocess_server, real_space, tmp_path, scales):
    space, channels = real_space
    scale = [1.0] * (channels if scales == "shift and scale differ" else 3)
    problem = (f"its channel shift (3,) and scale ({channels},) differ in shape" if scales == "shift and scale differ"
               else f"it scales 3 channels where its features have {channels}")
    like = json.dumps({**space, "shift": float32_array([0.0] * 3), "scale": float32_array(scale)})
    assert refusal_of_space(inprocess_server, like, tmp_path) == (
        f"the requested feature space is damaged: {problem}; pass --like a feature file or model from this dinofeat.")


def test_a_2_6_mb_feature_space_is_refused_without_holding_up_other_calls(inprocess_server, tmp_path):
    like = json.dumps({"format": "dinofeat-space/1", "padding": [0.5] * 520_000})  # 2.6 MB; parsing it takes ~0.4 s
    assert len(like) > 2_600_000
    latencies, done = [], threading.Event()

    def ping() -> None:
        with inprocess_server.client() as pinger:
            while not done.is_set():
                latencies.append(seconds_taken(pinger.status))
                time.sleep(0.01)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        for _ in range(3):
            assert refusal_of_space(inprocess_server, like, tmp_path).startswith("the requested feature space has about 520")
    finally:
        done.set()
        pinger.join()
    assert latencies and max(latencies) < 0.25, latencies


def test_an_old_local_servers_shutdown_leaves_its_successors_socket(monkeypatch):
    folder = tempfile.mkdtemp(prefix="df-", dir="/tmp")  # a Unix socket path has at most 107 bytes
    socket_path = os.path.join(folder, "key.sock")

    async def scenario() -> bool:
        old_server, old_servicer, old_identity = await start_local(socket_path, "cpu", None, IdleWatch())
        new_server, new_servicer, new_identity = await start_local(socket_path, "cpu", None, IdleWatch())
        await stop_local(old_server, old_servicer, socket_path, old_identity)
        del old_server, old_servicer
        gc.collect()  # gRPC removes the path it bound when the server object goes
        await asyncio.sleep(0.2)
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
                reply = await pb_grpc.FeatureServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
            return bool(reply.version)
        finally:
            await stop_local(new_server, new_servicer, socket_path, new_identity)

    try:
        assert asyncio.run(scenario())
        assert not os.path.exists(socket_path)  # the newer server removed its own socket on the way out
        assert os.listdir(folder) == []
    finally:
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
