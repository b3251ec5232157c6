"""Threads of a worker: workers x threads stay within the cores by default, `threads` comes from the
TOML file or --threads, and a server computes with exactly that many (torch, BLAS/OpenMP, the forest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ServerProcess, dinofeat
from dinofeat_client.client import FeatureClient
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.segment.classifiers import train_classifier
from dinofeat_server.segment.model_file import model_from_bytes
from dinofeat_server.service.config import ServerLimits, read_config, serve_settings
from dinofeat_server.segment.classifiers import with_threads


def test_threads_default_to_the_cores_of_this_process_shared_out_between_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    assert [ServerLimits(workers=w).threads_per_worker(1) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_threads_come_from_the_config_file_and_the_flag_overrides_it(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("[limits]\nworkers = 2\nthreads = 3\n")
    assert read_config(path)[1].threads_per_worker(1) == 3
    assert serve_settings(path, {}, {"threads": 1})[1].threads_per_worker(1) == 1
    path.write_text("[limits]\nthreads = 0\n")
    with pytest.raises(DinofeatError, match="the limit threads must be a positive number, not 0"):
        read_config(path)


def test_a_server_with_one_thread_per_worker_computes_with_one_thread_in_its_workers():
    """torch's and OpenMP's thread counts belong to each thread: asked inside a worker thread itself."""
    code = """
import asyncio, json, torch
from threadpoolctl import threadpool_info
from dinofeat_server.service.config import ServerLimits
from dinofeat_server.service.server import start_server

def in_a_worker():
    torch.nn.functional.conv2d(torch.ones(1, 1, 64, 64), torch.ones(1, 1, 3, 3))
    return {"torch": torch.get_num_threads(), "pools": {p["internal_api"]: p["num_threads"] for p in threadpool_info()}}

async def main():
    server, port, servicer = await start_server("127.0.0.1", 0, "cpu", limits=ServerLimits(workers=2, threads=1))
    seen = await asyncio.get_running_loop().run_in_executor(servicer.executor, in_a_worker)
    await server.stop(None)
    servicer.close()
    print(json.dumps(seen))

asyncio.run(main())
"""
    seen = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout)
    assert seen["torch"] == 1
    assert seen["pools"] and set(seen["pools"].values()) == {1}, seen["pools"]  # openblas and openmp


def test_status_reports_the_threads_per_worker():
    server = ServerProcess("--workers", "2", "--threads", "1")
    try:
        with FeatureClient(server.address) as client:
            assert (client.status().workers, client.status().threads_per_worker) == (2, 1)
        assert "  threads           1 per worker (torch, BLAS/OpenMP, forest)" in dinofeat("status", "--server", server.address).stdout
        assert "(device cpu; 2 workers x 1 thread, queue 64)" in server.log
    finally:
        server.stop()


def test_the_embedded_server_has_one_worker_with_a_thread_per_core():
    code = ("import os; from dinofeat_client.client import FeatureClient; from dinofeat_server.service.server import EmbeddedServer\n"
            "with EmbeddedServer('cpu') as address, FeatureClient(address) as client:\n"
            "    status = client.status(); print(status.workers, status.threads_per_worker, len(os.sched_getaffinity(0)))")
    workers, threads, cores = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                             timeout=120).stdout.split()
    assert (workers, threads) == ("1", cores)


def test_a_forest_trained_on_a_one_thread_server_has_one_job(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    labels = np.zeros((64, 64), np.uint8)
    labels[:8, :8], labels[-8:, -8:] = 1, 2
    server = ServerProcess("--threads", "1")
    try:
        with FeatureClient(server.address) as client:
            client.train([image], [labels], tmp_path / "m.dfm", trees=5)
    finally:
        server.stop()
    assert model_from_bytes((tmp_path / "m.dfm").read_bytes()).classifier.n_jobs == 1


def test_a_forest_applied_by_a_server_predicts_on_its_threads_and_the_held_model_stays_as_it_was():
    samples, classes = np.random.default_rng(0).random((40, 3)), np.repeat([1, 2], 20)
    forest = train_classifier(samples, classes, trees=3)
    predicting = with_threads(forest, 2)
    assert (predicting.n_jobs, forest.n_jobs) == (2, -1)
    assert np.array_equal(predicting.predict_proba(samples), forest.predict_proba(samples))
