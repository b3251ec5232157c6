"""A per-user local server that keeps torch, scikit-learn and models loaded between commands.

A command without --server looks for this user's local server on a Unix socket in a private folder
($XDG_RUNTIME_DIR/dinofeat, else ~/.cache/dinofeat/run; mode 0700, so no token is needed), one server per
key: the installation (interpreter prefix and package folder, so two checkouts or environments each keep their
own), the dinofeat version, --device and the --weights files (path, size, modification time). When none
answers it starts one, detached (`python -m dinofeat_server.service.local_server SOCKET ...`, one worker with
every core, its log beside the socket), under an fcntl lock on the key's lock file so that commands started
at once start one server, and waits until its gRPC health service says SERVING. A socket that does not
answer (its server died) is removed and a new server started. The server exits after
$DINOFEAT_LOCAL_IDLE_MINUTES (default 15) minutes without a call, deciding so under the same lock
(server/dinofeat_server/service/local_server.py, serve_local). DINOFEAT_LOCAL_SERVER=0 or --no-local-server
keep the embedded server in the command's own process.

The files' names and the lock are dinofeat.contract.local_server's, shared with the started server. Nothing here
imports the server or torch: the server part is imported only in the started process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # as client.py: before grpc loads
import grpc  # noqa: E402

from dinofeat import __version__  # noqa: E402
from dinofeat.contract.errors import DinofeatError  # noqa: E402
from dinofeat.contract.local_server import (  # noqa: E402
    IDLE_MINUTES,
    SERVER_MODULE,
    LocalServer,
    installation,
    locked,
    private_folder,
    read_info,
    runtime_folder,
)

START_TIMEOUT_S = 120.0
"""Longest wait for a new server to answer (importing torch on a busy machine can take many seconds)."""
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"
"""HealthCheckResponse(status=SERVING) as bytes: the client checks health without grpc_health (a server extra)."""
SOCKET_PATH_MAX = 107
"""Longest Unix socket path Linux accepts (sun_path is 108 bytes with its final NUL)."""
OFF = ("0", "false", "no", "off")
LOG_BYTES = 1 << 20
"""A server log larger than this is started afresh when its next server starts (one line per request)."""


def wanted(no_local_server: bool = False) -> bool:
    """Whether to use a local server: not with --no-local-server (`no_local_server`) or DINOFEAT_LOCAL_SERVER=0, and
    only on POSIX systems (Unix sockets in a private folder, fcntl locks)."""
    return (os.name == "posix" and not no_local_server
            and os.environ.get("DINOFEAT_LOCAL_SERVER", "1").lower() not in OFF)


def idle_minutes() -> float:
    """Minutes without a call after which a new local server exits: $DINOFEAT_LOCAL_IDLE_MINUTES, default 15."""
    value = os.environ.get("DINOFEAT_LOCAL_IDLE_MINUTES", "")
    try:
        return float(value) if value and float(value) > 0 else IDLE_MINUTES
    except ValueError:
        raise DinofeatError(f"DINOFEAT_LOCAL_IDLE_MINUTES is {value!r}, not a number of minutes; unset it or give e.g. 15.") from None


def server_key(device: str, weights: dict[str, str] | None) -> str:
    """What a server must match to be reused: the installation, the dinofeat version, the device and each weights
    file's path, size and modification time (a file changed in place gets a new server). Two checkouts of one version
    have different keys, so each keeps its own server instead of replacing the other's on every command."""
    files = []
    for backbone, path in sorted((weights or {}).items()):
        try:
            found = os.stat(path)
            files.append([backbone, path, found.st_size, found.st_mtime_ns])
        except OSError:
            files.append([backbone, path, None, None])
    text = json.dumps({"installation": installation(), "version": __version__, "device": device, "weights": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def answers(server: LocalServer, timeout_s: float = 2.0) -> bool:
    """Whether a server on the socket says SERVING through the standard gRPC health service."""
    if not server.socket.exists():
        return False
    with grpc.insecure_channel(server.address) as channel:
        try:
            return channel.unary_unary(HEALTH_METHOD)(b"", timeout=timeout_s) == SERVING
        except grpc.RpcError:
            return False


def local_address(device: str, weights: dict[str, str] | None, notify: Callable[[str], None]) -> str | None:
    """The address of this user's local server for (device, weights), started if none answers; None (after one
    notice line) when it cannot start for a reason the embedded server does not share, or when the server part
    is not installed (the embedded server then says so). A failure the embedded server would have too (an
    unusable --device) raises its sentence."""
    if importlib.util.find_spec("dinofeat_server") is None or importlib.util.find_spec("torch") is None:
        return None  # no server part installed: the embedded server says so
    weights = {name: os.path.abspath(path) for name, path in weights.items()} if weights else None
    minutes = idle_minutes()
    server = usable_files(device, weights, notify)
    if server is None:
        return None
    stamp = code_stamp()
    try:
        with locked(server.lock, START_TIMEOUT_S + 10):
            if answers(server) and served_code(server) == stamp:
                return server.address
            pid = start(server, device, weights, minutes, stamp)
    except (OSError, TimeoutError) as problem:
        notify(f"the local server could not start ({problem}); using a server in this process (log: {server.log}).")
        return None
    notify(f"started a local dinofeat server (pid {pid}) that keeps models loaded; it exits after {minutes:g} min idle; "
           "`dinofeat local stop` ends it.")
    return server.address


def usable_files(device: str, weights: dict[str, str] | None, notify: Callable[[str], None]) -> LocalServer | None:
    """The files of the server for (device, weights) in the user's private folder; None after one notice line when
    the folder cannot be made or its socket path would be too long (a folder open to others raises)."""
    try:
        folder = private_folder(runtime_folder())
    except OSError as problem:
        notify(f"cannot make the local server's folder {runtime_folder()} ({problem.strerror}); using a server in this process "
               "(set XDG_RUNTIME_DIR to a folder of yours to keep one running).")
        return None
    server = LocalServer(folder, server_key(device, weights))
    if len(str(server.socket)) > SOCKET_PATH_MAX:
        notify(f"the local server's socket path {server.socket} is longer than a Unix socket may be; using a server in this "
               "process (set XDG_RUNTIME_DIR to a shorter folder to keep one running).")
        return None
    return server


def code_stamp() -> int:
    """The newest modification time (ns) of dinofeat's Python files (about 1 ms): after an edit of an editable
    install, or a reinstall under the same version, a server running the older code is replaced."""
    newest = 0
    for name in ("dinofeat", "dinofeat_client", "dinofeat_server"):
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            newest = max([newest, *(path.stat().st_mtime_ns for path in Path(folder).rglob("*.py"))])
    return newest


def served_code(server: LocalServer) -> int | None:
    """The code stamp the running server started with, as its info file says."""
    return (read_info(server.info) or {}).get("code")


def start(server: LocalServer, device: str, weights: dict[str, str] | None, minutes: float, stamp: int) -> int:
    """Start the server detached (own session: Ctrl+C in the terminal stays with the command) and wait until it
    answers; its pid. Called under the key's lock. The socket of a dead server, or of one running older code, is
    removed first: the latter finishes its open calls and exits (serve_local)."""
    with contextlib.suppress(FileNotFoundError):
        server.socket.unlink()
    command = [sys.executable, "-m", SERVER_MODULE, str(server.socket), "--device", device,
               "--idle-minutes", f"{minutes:g}", "--code", str(stamp)]
    for backbone, path in (weights or {}).items():
        command += ["--weights", f"{backbone}={path}"]
    with contextlib.suppress(OSError):
        if server.log.stat().st_size > LOG_BYTES:
            server.log.unlink()  # started afresh rather than kept growing
    with open(server.log, "ab") as log:
        os.chmod(server.log, 0o600)
        offset = log.tell()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=server.folder,
                                   start_new_session=True, close_fds=True)
    _STARTED.append(process)  # kept, not reaped: the server outlives this command
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(server, timeout_s=1.0):
        if process.poll() is not None:
            raise_startup_error(server, offset, process.returncode)
        if time.monotonic() > deadline:
            process.terminate()
            raise TimeoutError(f"it did not answer within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    return process.pid


_STARTED: list[subprocess.Popen] = []


def raise_startup_error(server: LocalServer, offset: int, status: int) -> None:
    """The server ended before answering: its one-sentence error (DinofeatError, as the embedded server would
    raise it) when it printed one in its log (after `offset`), else OSError naming its status."""
    with open(server.log, "rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    errors = [line.removeprefix("dinofeat: error: ") for line in lines if line.startswith("dinofeat: error: ")]
    if errors:
        raise DinofeatError(errors[-1])
    raise OSError(f"it ended with status {status} before answering")


def running(folder: Path | None = None) -> list[dict]:
    """This user's local servers whose process is alive, as their info files describe them; the files of dead
    ones (info, socket) are removed."""
    folder = folder or runtime_folder()
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        info = read_info(path)
        if info is None:
            continue
        if is_local_server(info.get("pid", 0)):
            found.append(info)
        else:
            for stale in (path, path.with_suffix(".sock")):
                with contextlib.suppress(OSError):
                    stale.unlink()
    return found


def is_local_server(pid: int) -> bool:
    """Whether `pid` is a running local server of this user (its command line names this module; without /proc,
    whether it runs)."""
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        return SERVER_MODULE.encode() in command and os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def stop(info: dict, wait_s: float = 10.0) -> None:
    """Stop one local server: SIGTERM (it finishes open calls within 5 s and removes its socket and info file), SIGKILL
    after `wait_s` (the next command then finds its socket dead and replaces it)."""
    pid = info["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while is_local_server(pid) and not _ended(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def _ended(pid: int) -> bool:
    """Whether `pid` has exited (a zombie of this process counts: it is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    return False


def describe(info: dict) -> str:
    """One line about a running local server for `dinofeat local status`."""
    weights = ", ".join(f"{name}={path}" for name, path in (info.get("weights") or {}).items()) or "default"
    minutes = (time.time() - info.get("started", time.time())) / 60
    return (f"pid {info['pid']}: dinofeat {info.get('version')} from {info.get('installation', 'an unknown installation')}, "
            f"device {info.get('device')}, weights {weights}, up {minutes:.0f} min, "
            f"exits after {info.get('idle_minutes', IDLE_MINUTES):g} min idle; socket {info.get('socket')}, log {info.get('log')}")



