"""Many images in one command: what the inputs name, what `-o` means for them, and a run that goes on
after a failure.

One definition serves every command that takes several images (`apply`, `fewshot`):
- each input is an image file, a folder (its image files, sorted, not recursive, hidden files aside)
  or a glob pattern (`"data/*.tif"`, expanded here when the shell did not);
- `-o` names a folder when there are several inputs, or it is an existing folder, or it has no
  suffix (`-o results`); the folder is created (with its parents) when missing, and each output is
  named after its input's stem. Otherwise (one input, `-o seg.tif`) it names the output file itself
  (outputs.py holds the policy every output follows);
- outputs in a folder that already exist are skipped unless `--overwrite`, which also removes what an earlier
  run wrote for that image and this one does not (its NAME.probabilities.h5, its pictures): earlier_outputs;
- a failing image is reported and the rest go on; the command exits non-zero if any failed. A server
  that stays unavailable (after the client's retries) ends the batch: the images left are not tried,
  and the same command run again skips what is done.
"""

from __future__ import annotations

import glob
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dinofeat.contract import outputs
from dinofeat.contract.errors import DinofeatError, ServerUnavailable

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
    """`-o` for several inputs: a folder, created (with its parents) when missing; refused in one sentence
    when it is a file or cannot be written in (the one output policy, outputs.py)."""
    return outputs.output_folder(output)


def writes_to_folder(inputs: list[Path], output: str) -> bool:
    """Whether `-o` names a folder: several inputs, an existing folder, or a name without a suffix."""
    return len(inputs) > 1 or Path(output).is_dir() or not Path(output).suffix


@dataclass
class BatchReport:
    """What happened to each input of a batch."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    not_tried: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.done)} done"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped (outputs exist; --overwrite replaces them)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed: " + "; ".join(f"{p.name}: {why.rstrip('.')}" for p, why in self.failed))
        if self.not_tried:
            parts.append(f"{len(self.not_tried)} not tried (the server is unavailable; run the same command again "
                         "to do them)")
        return ", ".join(parts) + "."


def run_batch(inputs: list[Path], work: Callable[[Path], None], exists: Callable[[Path], bool],
              progress: Callable[[str, int, int], None]) -> BatchReport:
    """Call work(input) for each input whose outputs do not exist, going on after a failure (one line
    on stderr each; a file that cannot be read or written counts as one), but not after the server
    became unavailable; `progress` hears ("images", done, total)."""
    report = BatchReport()
    progress("images", 0, len(inputs))
    for number, path in enumerate(inputs, 1):
        if exists(path):
            report.skipped.append(path)
        else:
            try:
                work(path)
                report.done.append(path)
            except (DinofeatError, OSError) as error:
                why = str(error) if isinstance(error, DinofeatError) else f"{error.strerror or error} ({error.filename or path})"
                report.failed.append((path, why))
                print(f"dinofeat: {path}: {why}", file=sys.stderr)
                if isinstance(error, ServerUnavailable):
                    report.not_tried = list(inputs[number:])
                    break
        progress("images", number, len(inputs))
    return report


def remove_earlier_outputs(folder: Path, outputs_of_one_image: str, written: list[Path]) -> list[Path]:
    """Remove the files in `folder` whose names fully match the regular expression `outputs_of_one_image` (every
    name a run of the command can write for one image) except those just `written`; the removed files. For
    --overwrite: an earlier run's probabilities or pictures never stay beside a class map they do not belong to."""
    kept = {path.resolve() for path in written}
    removed = [path for path in folder.iterdir()
               if re.fullmatch(outputs_of_one_image, path.name) and path.is_file() and path.resolve() not in kept]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
