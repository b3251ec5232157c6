"""Many images in one command: what the inputs name, what `-o` means for them, and a run that goes on
after a failure.

One definition serves every command that takes several images (`apply`, `fewshot`):
- each input is an image file, a folder (its image files, sorted, not recursive, hidden files aside)
  or a glob pattern (`"data/*.tif"`, expanded here when the shell did not);
- `-o` names a folder when there are several inputs, or it is an existing folder, or it has no
  suffix (`-o results`); the folder is created when its parent exists, and each output is named
  after its input's stem. Otherwise (one input, `-o seg.tif`) it names the output file itself;
- outputs in a folder that already exist are skipped unless `--overwrite`;
- a failing image is reported and the rest go on; the command exits non-zero if any failed.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DinofeatError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def image_files(inputs: list[str]) -> list[Path]:
    """The image files that `inputs` (files, folders, glob patterns) name, in order, each once."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
            if not found:
                raise DinofeatError(f"the folder {path} holds no TIFF, PNG or JPEG images.")
            files += found
        elif path.exists() or not glob.has_magic(item):
            files.append(path)  # a missing plain name is reported when it is read, as for one image
        else:
            matches = sorted(Path(p) for p in glob.glob(item) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise DinofeatError(f"no image file matches {item!r}.")
            files += matches
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    stems = [p.stem for p in unique.values()]
    doubled = sorted({s for s in stems if stems.count(s) > 1})
    if doubled:
        raise DinofeatError(f"several inputs are named {doubled[0]!r} (in different folders or formats); their outputs "
                            "would overwrite each other: give them in separate commands.")
    return list(unique.values())


def output_folder(output: str) -> Path:
    """`-o` for several inputs: a folder, created when its parent exists."""
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise DinofeatError(f"-o {folder} is a file, but several images need an output folder; name a folder.")
    if not folder.exists():
        if not folder.resolve().parent.is_dir():
            raise DinofeatError(f"the output folder {folder} cannot be created: {folder.resolve().parent} does not exist.")
        folder.mkdir()
    return folder


def writes_to_folder(inputs: list[Path], output: str) -> bool:
    """Whether `-o` names a folder: several inputs, an existing folder, or a name without a suffix."""
    return len(inputs) > 1 or Path(output).is_dir() or not Path(output).suffix


@dataclass
class BatchReport:
    """What happened to each input of a batch."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.done)} done"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (outputs exist; --overwrite replaces them)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed: " + "; ".join(f"{p.name}: {why}" for p, why in self.failed))
        return ", ".join(parts) + "."


def run_batch(inputs: list[Path], work: Callable[[Path], None], exists: Callable[[Path], bool],
              progress: Callable[[str, int, int], None]) -> BatchReport:
    """Call work(input) for each input whose outputs do not exist, going on after a failure (one line
    on stderr each); `progress` hears ("images", done, total)."""
    report = BatchReport()
    progress("images", 0, len(inputs))
    for number, path in enumerate(inputs, 1):
        if exists(path):
            report.skipped.append(path)
        else:
            try:
                work(path)
                report.done.append(path)
            except DinofeatError as error:
                report.failed.append((path, str(error)))
                print(f"dinofeat: {path}: {error}", file=sys.stderr)
        progress("images", number, len(inputs))
    return report
