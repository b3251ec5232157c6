"""Shared fixtures: a real dinofeat server process on loopback, the shared data, helpers."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["DINOFEAT_LOCAL_SERVER"] = "0"  # commands compute in their own process (embedded server), so no test leaves
# a local server running; tests/test_local_server.py turns it on for its commands, in a runtime folder of its own
SHARED_DATA = ROOT.parent / "shared" / "data"


def dinofeat(*args: str, timeout: float = 300, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `dinofeat` command line in a fresh process (in `cwd`, with `env` added to the environment, when given)."""
    return subprocess.run([sys.executable, "-m", "dinofeat_client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The `dinofeat` command line run by its own main() in this process, its output captured: what `dinofeat` does
    without a new interpreter's start-up (use `dinofeat` where the process itself is under test: its exit, its
    environment, its signals)."""
    from dinofeat_client.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exit:  # argparse's usage errors
            status = exit.code
    return subprocess.CompletedProcess(["dinofeat", *args], status, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `dinofeat serve` process on 127.0.0.1: its address, its Popen and everything it printed so far."""

    def __init__(self, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = ""
        self.process = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "serve", "--port", str(self.port),
                                         "--device", "cpu", "--cache-gb", "0", *extra],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_until_listening()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log += line

    def wait_until_listening(self) -> None:
        """Plain TCP, so TLS servers are awaited the same way."""
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self._reader.join(5)
                pytest.fail("the dinofeat server did not start: " + self.log)
            time.sleep(0.1)

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reader.join(5)


def running_server(*extra: str):
    """Run `dinofeat serve` on a free 127.0.0.1 port until the generator is closed; yields its address."""
    server = ServerProcess(*extra)
    yield server.address
    server.stop()


@pytest.fixture(scope="session")
def server_address() -> str:
    """A `dinofeat serve` process for the whole session."""
    yield from running_server()


class InProcessServer:
    """A real gRPC server (servicer, scheduler, engine) on a loopback port in a thread of the test process, as
    tiktorch's tests run theirs: every option's way from the client to the engine without spawning a process.
    `settings` go to start_server (e.g. limits=ServerLimits(...), weights={...})."""

    def __init__(self, **settings):
        from dinofeat_server.service.server import EmbeddedServer

        self.embedded = EmbeddedServer(settings.pop("device", "cpu"), settings.pop("weights", None), **settings)
        self.address = self.embedded.__enter__()
        self.servicer = self.embedded.servicer

    def client(self, **options):
        from dinofeat_client.client import FeatureClient

        return FeatureClient(self.address, **options)

    def stop(self) -> None:
        self.embedded.__exit__(None, None, None)


def in_process(**settings):
    """An InProcessServer until the generator is closed (for fixtures: `yield from in_process(...)`)."""
    server = InProcessServer(**settings)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def inprocess_server() -> InProcessServer:
    """One in-process server for the session (classical sets; the default limits of an embedded server)."""
    yield from in_process()


@pytest.fixture(scope="session")
def inprocess_address(inprocess_server) -> str:
    """The address of the session's in-process server, for commands run with --server."""
    return inprocess_server.address


@pytest.fixture(scope="session")
def inprocess_deep_server(tiny_weights) -> InProcessServer:
    """One in-process server whose dinov2_vits14 is the tiny random-weight model."""
    yield from in_process(weights={"dinov2_vits14": str(tiny_weights)})


@pytest.fixture(scope="session")
def inprocess_deep_address(inprocess_deep_server) -> str:
    return inprocess_deep_server.address


@pytest.fixture(scope="session")
def isb_three_phase() -> Path:
    folder = SHARED_DATA / "isb_three_phase"
    if not folder.is_dir():
        pytest.skip(f"the shared data folder {folder} is absent")
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny random-weight DINOv2 (real architecture) saved in the official layout."""
    from tiny_vit import save_official, tiny_model

    return save_official(tiny_model(), tmp_path_factory.mktemp("weights") / "tiny_vits14.pth")


@pytest.fixture(scope="session")
def deep_server_address(tiny_weights) -> str:
    """A `dinofeat serve` process whose dinov2_vits14 is the tiny model."""
    yield from running_server("--weights", f"dinov2_vits14={tiny_weights}")


def noise(seed: int, size: int) -> np.ndarray:
    """A size x size uint8 image of uniform noise, the same for the same seed."""
    return (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)


def wait_for(condition, seconds: float = 60, what: str = "the condition") -> None:
    """Poll `condition` every 50 ms; fail the test when it has not held within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {seconds} s")
        time.sleep(0.05)
