"""Where outputs go: one policy for every command, and one sentence for every failure to write.

- A file output (`-o seg.tif`, `--probabilities p.h5`, a model, a picture) may replace an existing file
  but not a folder; an output folder (`-o results` for many images, an ilastik project, the demo) may
  be an existing folder but not a file. Either's folder is created, parents and all, when missing
  (`output_file`, `output_folder`).
- An output that cannot be written is refused in one sentence before anything is uploaded: a folder
  where a file is needed or the converse, a path through a file, a read-only file system, a folder
  this user may not write in.
- Every file is written under a temporary name in its own folder and renamed when complete
  (`atomic_write`; streamed results grow as NAME.partial, see dataset_file.py): nothing is ever written
  outside the output's own folder, and a failed write leaves nothing behind but a resumable partial.
- Any OSError while writing (a full disk, a file too large, a read-only file system, no permission)
  becomes one DinofeatError sentence naming the file (`write_failure`, `writing`).
- Inside `tidy_on_failure` (every CLI command), folders these functions created are removed again
  when the command fails and they are still empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .errors import DinofeatError

T = TypeVar("T")
_created: list[Path] | None = None
"""Folders created inside the current `tidy_on_failure`, in creation order (None outside one)."""


def output_file(path: str | os.PathLike) -> Path:
    """A file output that can be written: its folder exists (created when missing) and takes new files,
    and the path itself is not a folder; otherwise one sentence saying why not."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise DinofeatError(f"the output {path} names a folder, but a file is written here; name a file, "
                            f"e.g. {path.rstrip('/' + os.sep) or '.'}{os.sep}result with the command's suffix.")
    path = Path(path)
    if path.is_dir():
        raise DinofeatError(f"the output {path} is a folder; name a file (in it, or instead of it).")
    usable_folder(path.absolute().parent, path, f"the output {path}")
    return path


def output_folder(path: str | os.PathLike) -> Path:
    """An output folder that can be written in: created (with its parents) when missing; otherwise one
    sentence saying why not."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise DinofeatError(f"the output {folder} is a file, but a folder is needed here; name a folder.")
    usable_folder(folder.absolute(), folder, f"the output folder {folder}")
    return folder


def usable_folder(folder: Path, output: Path, what: str) -> None:
    """Create `folder` (with its parents) when missing, and check that it takes a new file (a temporary
    one, gone at once): a read-only file system, missing permission or a full disk is refused now."""
    if not folder.is_dir():
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise DinofeatError(f"cannot create the folder of {what}: {existing} is a file, not a folder; choose another path.")
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DinofeatError(f"cannot create the folder {folder} for {what}: {reason(error)}; choose another path.") from None
        if _created is not None:
            _created.extend(reversed(missing))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise write_failure(error, output) from None


@contextlib.contextmanager
def tidy_on_failure() -> Iterator[None]:
    """Remove again the folders that output_file/output_folder create inside, when the block fails and they are empty."""
    global _created
    outer, _created = _created, []
    try:
        yield
    except BaseException:
        for folder in reversed(_created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty folder goes
        raise
    finally:
        _created = outer if outer is None else outer + _created


def error_number(error: BaseException) -> int | None:
    """The errno of an OSError, or the one HDF5 names in its message ("errno = 28") when h5py gave none."""
    number = getattr(error, "errno", None)
    if isinstance(number, int) and number not in (0, errno.EINVAL) or not str(error):
        return number
    found = re.findall(r"errno = (\d+)", str(error))
    meaningful = [int(n) for n in found if int(n) not in (0, errno.EINVAL, errno.EBADF)]
    return meaningful[0] if meaningful else number


def reason(error: BaseException) -> str:
    """What went wrong, in a few lowercase words (the system's own for an errno)."""
    number = error_number(error)
    if number:
        return os.strerror(number).lower()
    return (getattr(error, "strerror", None) or str(error).split("(")[0].strip() or type(error).__name__).lower()


def write_failure(error: BaseException, path: str | os.PathLike, then: str = "run the command again") -> DinofeatError:
    """One sentence for a failed write of `path`: what happened and what to do (`then`: the last step)."""
    path = Path(path)
    number = error_number(error)
    folder = path.absolute().parent
    if number == errno.ENOSPC:
        return DinofeatError(f"cannot write {path}: the disk is full (no space left on device); free some space or "
                             f"write the output elsewhere, then {then}.")
    if number == errno.EDQUOT:
        return DinofeatError(f"cannot write {path}: the disk quota is used up; free some space or write the output "
                             f"elsewhere, then {then}.")
    if number == errno.EFBIG:
        return DinofeatError(f"cannot write {path}: the file would exceed the largest file this process may write "
                             f"(file too large: a file system or `ulimit -f` limit); write it elsewhere or raise the limit, then {then}.")
    if number == errno.EROFS:
        return DinofeatError(f"cannot write {path}: {folder} is on a read-only file system; write the output elsewhere.")
    if number in (errno.EACCES, errno.EPERM):
        return DinofeatError(f"cannot write {path}: this user may not write there (permission denied); write the output elsewhere.")
    if number == errno.EISDIR:
        return DinofeatError(f"cannot write {path}: it is a folder; name a file.")
    if number is None and re.search(r"\d+ written", str(error)):  # a short write, as tifffile reports it
        return DinofeatError(f"cannot write {path}: only part of it could be written (the disk is full, or the file "
                             f"reached a size limit); free some space or write the output elsewhere, then {then}.")
    if number in (errno.ENOENT, errno.ENOTDIR):
        return DinofeatError(f"cannot write {path} (no such file or directory: {folder} was removed, or takes no files); "
                             f"choose another folder, then {then}.")
    return DinofeatError(f"cannot write {path} ({reason(error)}); check the disk, then {then}.")


def io_failure(error: BaseException) -> DinofeatError:
    """One sentence for a failed read or write that no write site caught (the CLI's last resort: never a traceback)."""
    filename = getattr(error, "filename", None)
    if error_number(error) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return write_failure(error, filename or "an output")
    where = f" ({filename})" if filename is not None else ""
    return DinofeatError(f"a file could not be read or written{where}: {reason(error)}; check the paths and the disk.")


def is_write_error(error: BaseException) -> bool:
    """An OSError, or one of the RuntimeErrors h5py raises when HDF5 fails to write ("errno = 28")."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and error_number(error) is not None)


@contextlib.contextmanager
def writing(path: str | os.PathLike, then: str = "run the command again") -> Iterator[None]:
    """Turn a failed write inside the block into one sentence about `path` (write_failure)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if not is_write_error(error):
            raise
        raise write_failure(error, path, then) from None


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a temporary file if it is there; a failure to remove it (read-only, gone) is not worth a second error."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], T]) -> Path:
    """Call write(temporary path) in `path`'s folder, then rename the file to `path`: no half-written
    file under the final name, no temporary file left after a failure, one sentence for any I/O error."""
    path = output_file(path)
    with writing(path):
        handle, temporary = tempfile.mkstemp(dir=path.absolute().parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            write(Path(temporary))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes private files; outputs get the usual mode
            os.replace(temporary, path)
        finally:
            remove_quietly(temporary)
    return path


def atomic_result(path: str | os.PathLike, write: Callable[[Path], T]) -> T:
    """atomic_write that returns what write(temporary path) returned."""
    result: list[T] = []
    atomic_write(path, lambda temporary: result.append(write(temporary)))
    return result[0]
