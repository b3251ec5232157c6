"""The files of a user's local server, written and read by both sides: one owner for that protocol.

A local server (started by the client, served by the server package) lives in a private folder
($XDG_RUNTIME_DIR/dinofeat, else ~/.cache/dinofeat/run; mode 0700, so no token is needed) as four files named by
its key: KEY.sock (its Unix socket), KEY.lock (the fcntl lock under which clients start a server and the server
decides to exit when idle), KEY.log and KEY.json (its info file: pid, version, installation, device, weights, idle
minutes, code stamp, start time). The started process is `python -m SERVER_MODULE SOCKET ...`; `dinofeat local`
recognises a server's process by that module name in its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DinofeatError

SERVER_MODULE = "dinofeat_server.service.local_server"
"""The module a local server's process runs (`python -m`), and what its command line is recognised by."""
IDLE_MINUTES = 15.0
"""Minutes without a call after which a local server exits, unless $DINOFEAT_LOCAL_IDLE_MINUTES says otherwise."""


@dataclass(frozen=True)
class LocalServer:
    """The files of one local server, all in the user's private folder and named by its key."""

    folder: Path
    key: str

    @classmethod
    def of_socket(cls, socket: Path) -> LocalServer:
        """The server whose socket is `socket` (how the started process finds its other files)."""
        return cls(socket.parent, socket.stem)

    @property
    def socket(self) -> Path:
        return self.folder / f"{self.key}.sock"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.key}.lock"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.key}.log"

    @property
    def info(self) -> Path:
        return self.folder / f"{self.key}.json"

    @property
    def address(self) -> str:
        return f"unix:{self.socket}"


def runtime_folder() -> Path:
    """The folder of this user's local servers: $XDG_RUNTIME_DIR/dinofeat, else ~/.cache/dinofeat/run."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "dinofeat" if runtime else Path.home() / ".cache" / "dinofeat" / "run"


def private_folder(folder: Path) -> Path:
    """`folder`, created with mode 0700 when missing; refused in one sentence when another user owns it or
    others may enter it, since anyone who can reach the socket can use the server (it takes no token)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode):
        raise DinofeatError(f"the local server's folder {folder} is not a folder; remove it, or pass --no-local-server.")
    if found.st_uid != os.getuid():
        raise DinofeatError(f"the local server's folder {folder} belongs to another user, so its socket could be theirs; "
                            "remove it, set XDG_RUNTIME_DIR to a folder of yours, or pass --no-local-server.")
    if found.st_mode & 0o077:
        raise DinofeatError(f"the local server's folder {folder} is open to other users (mode {stat.S_IMODE(found.st_mode):o}), "
                            f"who could use its server; run `chmod 700 {folder}`, or pass --no-local-server.")
    return folder


@contextlib.contextmanager
def locked(path: Path, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `path` (created 0600); TimeoutError when another holds it for `timeout_s`."""
    import fcntl  # POSIX only: imported where used, so that the client loads elsewhere too

    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} stayed locked for {timeout_s:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def write_info(server: LocalServer, **facts: object) -> None:
    """The started server's info file: its pid, socket and log beside `facts` (version, installation, device, ...)."""
    server.info.write_text(json.dumps({"pid": os.getpid(), **facts, "started": time.time(), "socket": str(server.socket),
                                       "log": str(server.log)}))


def read_info(path: Path) -> dict | None:
    """A server's info file as a dict; None when it is gone or unreadable (a server that is starting or leaving)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def remove_own_info(server: LocalServer) -> None:
    """Remove the info file on the way out, unless a newer server has written its own there."""
    with contextlib.suppress(OSError):
        if (read_info(server.info) or {}).get("pid") == os.getpid():
            server.info.unlink()


def installation() -> str:
    """Which dinofeat is running: the interpreter's prefix (its virtual environment) and the packages' folder (its
    checkout, for an editable install), e.g. "/home/me/dinofeat/.venv (code in /home/me/dinofeat/clients)"."""
    return f"{sys.prefix} (code in {Path(__file__).resolve().parents[2]})"
