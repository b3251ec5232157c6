"""The per-user local server (clients/dinofeat_client/local_server.py), with real processes: commands without
--server start one on a Unix socket in a private runtime folder, reuse it, and it exits when idle or stopped.
Every test has its own runtime folder (XDG_RUNTIME_DIR in tmp); every server started is killed at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import dinofeat, wait_for

NOTICE = "started a local dinofeat server (pid "
pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="these tests find the servers' processes in /proc (Linux)")


class Runtime:
    """A runtime folder of its own, the environment that turns the local server on there, and the servers in it."""

    def __init__(self, folder: Path, **extra: str):
        self.folder = folder
        self.env = {"XDG_RUNTIME_DIR": str(folder), "DINOFEAT_LOCAL_SERVER": "1", **extra}

    @property
    def servers(self) -> Path:
        return self.folder / "dinofeat"

    def pids(self) -> list[int]:
        """Pids of the live processes whose command line names this runtime folder (the local servers started in it)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if f"{self.folder}/".encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_for(lambda: not self.pids(), 10, "the local servers' end")

    def segment(self, sample: tuple[Path, Path], output: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
        """`dinofeat segment` of the sample in a fresh process; its result and wall time."""
        start = time.perf_counter()
        done = dinofeat("segment", str(sample[0]), "--labels", str(sample[1]), "-o", str(output), "--trees", "10",
                        "--seed", "0", "--quiet", *extra, env=self.env, timeout=180)
        assert done.returncode == 0, done.stderr
        return done, time.perf_counter() - start


def started_pid(done: subprocess.CompletedProcess) -> int | None:
    """The pid the command's notice names when it started a local server, else None."""
    for line in done.stderr.splitlines():
        if line.startswith(NOTICE):
            return int(line[len(NOTICE):].split(")")[0])
    return None


def alive(pid: int) -> bool:
    try:
        return b"local_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture()
def runtime(tmp_path_factory) -> Runtime:
    """A fresh runtime folder (short path: a socket path has at most 107 bytes); kills its servers at the end."""
    made = Runtime(tmp_path_factory.mktemp("rt"))
    yield made
    made.kill_all()


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, Path]:
    """A small two-phase image with noise and scribbles of both phases, as TIFF files."""
    folder = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(0)
    image = np.where(np.arange(96)[None, :] < 48, 60, 180) + rng.normal(0, 25, (96, 96))
    labels = np.zeros((96, 96), np.uint8)
    labels[10:80, 10:20], labels[10:80, 70:80] = 1, 2
    tifffile.imwrite(folder / "image.tif", np.clip(image, 0, 255).astype(np.uint8))
    tifffile.imwrite(folder / "labels.tif", labels)
    return folder / "image.tif", folder / "labels.tif"


def test_the_second_segment_reuses_the_first_ones_server_is_faster_and_writes_what_an_embedded_server_writes(
        runtime, sample, tmp_path):
    first, first_s = runtime.segment(sample, tmp_path / "first.tif")
    pid = started_pid(first)
    assert pid and alive(pid), first.stderr
    assert first.stderr.count(NOTICE) == 1 and "exits after 15 min idle; `dinofeat local stop` ends it." in first.stderr
    second, second_s = runtime.segment(sample, tmp_path / "second.tif")
    assert started_pid(second) is None and second.stderr == ""
    assert second_s < first_s, (first_s, second_s)
    status = dinofeat("local", "status", env=runtime.env)
    assert status.stdout.startswith(f"pid {pid}: ") and len(status.stdout.splitlines()) == 1
    code = ("import sys; from dinofeat_client.cli import main; status = main(sys.argv[1:]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sklearn', 'dinofeat_server'})); sys.exit(status)")
    thin = subprocess.run([sys.executable, "-c", code, "segment", str(sample[0]), "--labels", str(sample[1]), "-o",
                           str(tmp_path / "thin.tif"), "--trees", "10", "--quiet"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **runtime.env})
    assert thin.returncode == 0 and thin.stdout.splitlines()[-1] == "[]", thin.stderr  # the client stays thin
    embedded, _ = runtime.segment(sample, tmp_path / "embedded.tif", "--no-local-server")
    assert started_pid(embedded) is None
    assert np.array_equal(tifffile.imread(tmp_path / "second.tif"), tifffile.imread(tmp_path / "embedded.tif"))
    assert runtime.pids() == [pid]


def test_two_commands_started_at_once_start_one_server(runtime, sample, tmp_path):
    command = [sys.executable, "-m", "dinofeat_client.cli", "segment", str(sample[0]), "--labels", str(sample[1]),
               "--trees", "10", "--quiet", "-o"]
    both = [subprocess.Popen([*command, str(tmp_path / f"{n}.tif")], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **runtime.env}) for n in range(2)]
    notices = [process.communicate(timeout=180)[1] for process in both]
    assert [process.returncode for process in both] == [0, 0], notices
    assert sum(text.count(NOTICE) for text in notices) == 1, notices
    assert len(runtime.pids()) == 1


def test_the_socket_of_a_dead_server_or_of_one_running_older_code_gets_a_new_server(tmp_path_factory, sample, tmp_path):
    runtime = Runtime(tmp_path_factory.mktemp("rt"), DINOFEAT_LOCAL_IDLE_MINUTES="0.5")  # idle checks every 3 s
    try:
        first, _ = runtime.segment(sample, tmp_path / "first.tif")
        dead = started_pid(first)
        os.kill(dead, signal.SIGKILL)
        wait_for(lambda: not alive(dead), 10, "the server's death")
        assert list(runtime.servers.glob("*.sock")), "the dead server's socket should still be there"
        second, _ = runtime.segment(sample, tmp_path / "second.tif")
        older = started_pid(second)
        assert older and older != dead and alive(older), second.stderr
        (info,) = runtime.servers.glob("*.json")
        info.write_text(json.dumps({**json.loads(info.read_text()), "code": 1}))  # as if dinofeat's files changed since
        third, _ = runtime.segment(sample, tmp_path / "third.tif")
        newer = started_pid(third)
        assert newer and newer != older and json.loads(info.read_text())["pid"] == newer, third.stderr
        wait_for(lambda: not alive(older), 30, "the older server's exit")  # once idle for 5 s: its socket is taken
        assert runtime.pids() == [newer]
    finally:
        runtime.kill_all()


def test_another_device_gets_a_server_of_its_own_and_local_stop_ends_them_all(runtime, sample, tmp_path):
    auto, _ = runtime.segment(sample, tmp_path / "auto.tif")
    cpu, _ = runtime.segment(sample, tmp_path / "cpu.tif", "--device", "cpu")
    pids = {started_pid(auto), started_pid(cpu)}
    assert None not in pids and len(pids) == 2 and set(runtime.pids()) == pids
    assert len(list(runtime.servers.glob("*.sock"))) == 2
    stopped = dinofeat("local", "stop", env=runtime.env)
    assert stopped.returncode == 0 and sorted(stopped.stdout.splitlines()) == sorted(
        f"stopped the local dinofeat server (pid {pid})." for pid in pids)
    wait_for(lambda: not runtime.pids(), 10, "the servers' end")
    assert not list(runtime.servers.glob("*.sock")) and not list(runtime.servers.glob("*.json"))
    assert dinofeat("local", env=runtime.env).stdout == "no local dinofeat server is running for this user.\n"


def test_an_idle_server_exits_and_removes_its_socket(tmp_path_factory, sample, tmp_path):
    runtime = Runtime(tmp_path_factory.mktemp("rt"), DINOFEAT_LOCAL_IDLE_MINUTES="0.05")  # 3 s
    try:
        done, _ = runtime.segment(sample, tmp_path / "seg.tif")
        pid = started_pid(done)
        assert "exits after 0.05 min idle" in done.stderr
        wait_for(lambda: not alive(pid), 30, "the idle server's exit")
        assert not list(runtime.servers.glob("*.sock")) and not list(runtime.servers.glob("*.json"))
        assert "no call for 3 s: exiting" in next(runtime.servers.glob("*.log")).read_text()
    finally:
        runtime.kill_all()


def test_a_runtime_folder_open_to_others_is_refused_in_one_sentence(runtime, sample, tmp_path):
    runtime.servers.mkdir(mode=0o755)
    runtime.servers.chmod(0o755)
    done = dinofeat("segment", str(sample[0]), "--labels", str(sample[1]), "-o", str(tmp_path / "seg.tif"), env=runtime.env)
    assert done.returncode == 1
    assert done.stderr == (f"dinofeat: error: the local server's folder {runtime.servers} is open to other users (mode 755), "
                           f"who could use its server; run `chmod 700 {runtime.servers}`, or pass --no-local-server.\n")
    assert not runtime.pids() and not (tmp_path / "seg.tif").exists()


def test_a_socket_path_too_long_for_unix_gets_one_notice_and_an_embedded_server(tmp_path_factory, sample, tmp_path):
    runtime = Runtime(tmp_path_factory.mktemp("rt") / ("x" * 90))
    done, _ = runtime.segment(sample, tmp_path / "seg.tif")
    assert done.stderr.startswith("the local server's socket path ") and done.stderr.endswith(
        "using a server in this process (set XDG_RUNTIME_DIR to a shorter folder to keep one running).\n")
    assert len(done.stderr.splitlines()) == 1 and not runtime.pids() and (tmp_path / "seg.tif").exists()
