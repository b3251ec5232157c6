"""Running the peer programs for the pixel-classification benchmarks, each as its own process, as a user runs it:
`dinofeat segment`, a scikit-image script, headless ilastik 1.4.3 (its own 37 features, or a dinofeat project)
and Trainable Weka Segmentation in a local Fiji (its own features, or dinofeat's through `dinofeat fiji`).

Every process gets the same thread budget, THREADS (2), through its environment (tool_env): OMP_NUM_THREADS,
MKL/OpenBLAS/BLIS/numexpr/vecLib thread counts and LOKY_MAX_CPU_COUNT (torch, numpy, scikit-learn's
n_jobs=-1), LAZYFLOW_THREADS (ilastik) and JAVA_TOOL_OPTIONS=-XX:ActiveProcessorCount=2 (TWS's forest and
feature threads), and each process runs pinned to THREADS of this process's cores (sched_setaffinity)
where it may use more: some tools size their pools from the cores they see rather than from the variables
(dinofeat's server, the JVM, joblib). dinofeat's commands use the per-user local server as a user's do: the
first one starts it (and pays torch's import), the later ones find it loaded; DINOFEAT_LOCAL_SERVER=0 in the
benchmark's environment makes every command start cold instead.

A tool that cannot run raises ToolFailed with one sentence (the program's own last line where it printed
one), so that a benchmark records it in that tool's column and goes on.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import tifffile
from dinofeat_client.ilastik.headless import exported_class_map

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ILASTIK_INSTALL = SHARED / "tools" / "ilastik" / "install.sh"
FIJI_ARCHIVE = SHARED / "vendor" / "fiji" / "Fiji.app.tar.gz"
TWS_OWN_SCRIPT = ROOT / "tests" / "jvm" / "tws_own_features.py"
THREADS = 2
TIMEOUT_S = 1800
TWS_SEED = 1
"""The forest seed of both TWS columns (as tests/test_fiji_bridge.py uses)."""


class ToolFailed(Exception):
    """A tool could not run or failed on a case; str() is one sentence for the results."""


class ToolSkipped(ToolFailed):
    """A tool absent from this machine (ilastik not installable, no Fiji): the whole column is skipped."""


@dataclass
class Outcome:
    """One run of one tool on one case: its class map (in the case's class values) and wall time."""

    classes: np.ndarray
    seconds: float
    parts: dict[str, float] | None = None  # named sub-times (features, headless run...), when there are several


def tool_env() -> dict[str, str]:
    """This process's environment with every thread count set to THREADS."""
    n = str(THREADS)
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                 "NUMEXPR_MAX_THREADS", "VECLIB_MAXIMUM_THREADS", "LOKY_MAX_CPU_COUNT", "LAZYFLOW_THREADS"):
        env[name] = n
    env["JAVA_TOOL_OPTIONS"] = " ".join(filter(None, [env.get("JAVA_TOOL_OPTIONS", ""), f"-XX:ActiveProcessorCount={n}"]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pinned_cores() -> set[int] | None:
    """THREADS of the cores this process may run on, where it may run on more (None: leave as is)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return set(cores[:THREADS]) if len(cores) > THREADS else None


def _pin() -> None:
    cores = pinned_cores()
    if cores:
        os.sched_setaffinity(0, cores)


def last_line(text: str, default: str = "no message") -> str:
    """The last non-empty line of a program's output (its one-sentence error, for dinofeat)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else default


def run(command: list[str], cwd: Path, what: str, timeout: float = TIMEOUT_S) -> tuple[float, subprocess.CompletedProcess]:
    """Run `command` in `cwd` with the thread budget; its wall time and result, or ToolFailed with its last line."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout, env=tool_env(),
                              preexec_fn=_pin)
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{what} ran past {timeout:.0f} s") from None
    except OSError as error:
        raise ToolFailed(f"{what} could not start: {error.strerror or error}") from None
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise ToolFailed(last_line(done.stderr or done.stdout, f"{what} failed with status {done.returncode}"))
    return seconds, done


def dinofeat_cli() -> str:
    """The `dinofeat` command of this Python's environment (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("dinofeat")
    return str(beside) if beside.exists() else (shutil.which("dinofeat") or "dinofeat")


def class_values(scribbles: np.ndarray) -> list[int]:
    """The classes, in label order: the scribbles' non-zero values, ascending."""
    return sorted(int(v) for v in np.unique(scribbles) if v != 0)


def write_inputs(folder: Path, image: np.ndarray, scribbles: np.ndarray) -> tuple[Path, Path]:
    """The case's image and scribbles as TIFFs in `folder`, as a user has them."""
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "image.tif", image)
    tifffile.imwrite(folder / "scribbles.tif", scribbles)
    return folder / "image.tif", folder / "scribbles.tif"


def fresh(folder: Path, name: str) -> Path:
    """An empty subfolder `name` of `folder` (emptied if there from an earlier repeat)."""
    path = folder / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# dinofeat's own pipeline

def dinofeat_segment(image: Path, scribbles: Path, feature_set: str, work: Path, seed: int = 0) -> Outcome:
    """`dinofeat segment IMAGE --labels SCRIBBLES --set SET -o OUT.tif --seed 0`, end to end, as a process."""
    out = fresh(work, f"segment_{feature_set}") / "classes.tif"
    seconds, _ = run([dinofeat_cli(), "segment", str(image), "--labels", str(scribbles), "--set", feature_set,
                      "-o", str(out), "--seed", str(seed), "--quiet"], work, f"dinofeat segment --set {feature_set}")
    return Outcome(tifffile.imread(out), seconds)


# ilastik

_ilastik: dict[str, object] = {}


def ilastik_launcher() -> Path:
    """run_ilastik.sh, installed (or found installed) by the vendored install script; ToolSkipped with the
    script's last stderr line where it cannot be installed. The answer is kept for the process."""
    if "launcher" not in _ilastik:
        if not ILASTIK_INSTALL.is_file():
            _ilastik["launcher"] = ToolSkipped(f"{ILASTIK_INSTALL} is absent, so real ilastik cannot be installed here")
        else:
            try:
                done = subprocess.run(["bash", str(ILASTIK_INSTALL)], check=False, capture_output=True, text=True, timeout=3600)
                if done.returncode != 0:
                    _ilastik["launcher"] = ToolSkipped(f"ilastik could not be installed: {last_line(done.stderr)}")
                else:
                    _ilastik["launcher"] = Path(last_line(done.stdout))
            except subprocess.TimeoutExpired:
                _ilastik["launcher"] = ToolSkipped("ilastik's install script ran past an hour")
    found = _ilastik["launcher"]
    if isinstance(found, ToolSkipped):
        raise found
    return found


def exported(folder: Path, stem: str) -> Path:
    """The probabilities file ilastik exported for input `stem` into `folder` (its nickname adds the dataset's
    name: new-raw, new_features)."""
    found = sorted(folder.glob(f"{stem}*_Probabilities.h5"))
    if not found:
        raise ToolFailed(f"ilastik wrote no probabilities for {stem} into {folder.name}")
    return found[0]


def ilastik_headless(project: Path, inputs: list[str], cwd: Path, out: Path, readonly: bool = True) -> float:
    """Run a Pixel Classification project headless on `inputs` (h5 paths with their dataset, axes c,y,x),
    exporting probabilities into `out`; the wall time. ilastik trains at start from the project's labels."""
    command = [str(ilastik_launcher()), "--headless", f"--project={project}", "--export_source=Probabilities",
               "--output_format=hdf5", f"--output_filename_format={out}/{{nickname}}_{{result_type}}.h5",
               "--input_axes=cyx", "--raw_data", *inputs]
    if readonly:
        command.insert(2, "--readonly")
    seconds, done = run(command, cwd, "ilastik headless")
    if "Training complete" not in done.stdout + done.stderr:
        raise ToolFailed("ilastik did not train a classifier from the project's labels")
    return seconds


ALL_FEATURES = "all 37: every feature at sigma 0.7-10, Gaussian smoothing also at 0.3"


def ilastik_own_project(folder: Path, image: np.ndarray, scribbles: np.ndarray) -> Path:
    """A Pixel Classification project on the raw image (raw.h5/raw, axes c,y,x) with ilastik's full feature
    selection (all 37: SelectionMatrix all True except the five non-Gaussian features at sigma 0.3) and the
    scribbles as labels, written with dinofeat's project writer."""
    from dinofeat_client.ilastik.project import FEATURE_IDS, SCALES, Lane, write_project
    from dinofeat.contract.wire import axistags

    values = class_values(scribbles)
    with h5py.File(folder / "raw.h5", "w") as f:
        f["raw"] = image[None]
        f["raw"].attrs["axistags"] = axistags("cyx")
    labels = (np.searchsorted(values, scribbles) + 1).astype(np.uint8)
    labels[scribbles == 0] = 0
    lane = Lane("raw.h5", "raw", (1, *image.shape), axistags("cyx"), "raw", labels)
    project = write_project(folder / "own.ilp", [lane], [f"class {v}" for v in values])
    matrix = np.ones((len(FEATURE_IDS), len(SCALES)), dtype=bool)
    matrix[1:, SCALES.index(0.3)] = False  # ilastik offers only Gaussian smoothing at 0.3
    assert matrix.sum() == 37
    with h5py.File(project, "r+") as f:
        f["FeatureSelections/SelectionMatrix"][...] = matrix
    return project


def ilastik_own(image: np.ndarray, scribbles: np.ndarray, work: Path) -> Outcome:
    """ilastik's own 37 features and forest, trained on the scribbles at start of a headless run on the same
    image (a copy, as a user predicts a new file); times the headless run only."""
    ilastik_launcher()
    folder = fresh(work, "ilastik_own")
    project = ilastik_own_project(folder, image, scribbles)
    shutil.copy(folder / "raw.h5", folder / "new.h5")
    out = folder / "out"
    seconds = ilastik_headless(project, ["new.h5/raw"], folder, out)
    return Outcome(exported_class_map(exported(out, "new"), class_values(scribbles)), seconds)


def ilastik_ours(image_file: Path, scribbles_file: Path, feature_set: str, work: Path) -> Outcome:
    """dinofeat's features inside ilastik, the flow tests/test_ilastik_real.py follows: `dinofeat ilastik IMAGE -o
    proj --labels SCRIBBLES --set SET`, `dinofeat ilastik --batch proj new.tif` (a copy of the image), then the
    headless command it prints. Times all three; parts: project, batch, headless."""
    ilastik_launcher()
    folder = fresh(work, f"ilastik_ours_{feature_set}")
    shutil.copy(image_file, folder / "image.tif")
    shutil.copy(image_file, folder / "new.tif")
    shutil.copy(scribbles_file, folder / "scribbles.tif")
    dinofeat = dinofeat_cli()
    project_s, _ = run([dinofeat, "ilastik", "image.tif", "-o", "proj", "--labels", "scribbles.tif", "--set", feature_set,
                        "--quiet"], folder, f"dinofeat ilastik --set {feature_set}")
    batch_s, done = run([dinofeat, "ilastik", "--batch", "proj", "new.tif", "--quiet"], folder, "dinofeat ilastik --batch")
    command = shlex.split(last_line(done.stdout))
    if command[:1] != ["./run_ilastik.sh"] or "--headless" not in command:
        raise ToolFailed(f"dinofeat ilastik --batch printed no headless command (its last line: {last_line(done.stdout)})")
    start = time.perf_counter()
    run([str(ilastik_launcher()), *command[1:]], folder, "ilastik headless on dinofeat's project")
    headless_s = time.perf_counter() - start
    classes = exported_class_map(exported(folder / "proj", "new"), class_values(tifffile.imread(scribbles_file)))
    return Outcome(classes, project_s + batch_s + headless_s, {"project_s": project_s, "batch_s": batch_s, "headless_s": headless_s})


# Trainable Weka Segmentation

def fiji_dir() -> Path:
    """FIJI_DIR, else ../shared/vendor's Fiji.app unpacked once into ~/.cache/dinofeat-fiji (as ./dev's
    fiji_for_tests does); ToolSkipped where there is none."""
    if os.environ.get("FIJI_DIR"):
        return Path(os.environ["FIJI_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dinofeat-fiji"
    if not (cache / "Fiji.app" / "jars").is_dir():
        if not FIJI_ARCHIVE.is_file():
            raise ToolSkipped(f"no Fiji: FIJI_DIR is unset and {FIJI_ARCHIVE} is absent")
        cache.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".unpacking.", dir=cache))
        try:
            done = subprocess.run(["tar", "xzf", str(FIJI_ARCHIVE), "-C", str(scratch)], check=False, capture_output=True, text=True)
            if done.returncode != 0 or not (scratch / "Fiji.app" / "jars").is_dir():
                raise ToolSkipped(f"could not unpack {FIJI_ARCHIVE}: {last_line(done.stderr)}")
            shutil.rmtree(cache / "Fiji.app", ignore_errors=True)
            (scratch / "Fiji.app").rename(cache / "Fiji.app")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if shutil.which("java") is None and not list((cache / "Fiji.app").glob("java/**/libjvm.*")):
        raise ToolSkipped("no Java here to run Fiji")
    return cache / "Fiji.app"


def tws_ours(image: Path, scribbles: Path, feature_set: str, work: Path) -> Outcome:
    """`dinofeat fiji train ... --seed 1` then `dinofeat fiji apply`: dinofeat's features in TWS's forest.
    Times both; parts: train, apply."""
    fiji = str(fiji_dir())
    folder = fresh(work, f"tws_ours_{feature_set}")
    dinofeat = dinofeat_cli()
    train_s, _ = run([dinofeat, "fiji", "train", str(image), "--labels", str(scribbles), "--set", feature_set, "-o", "tws.model",
                      "--fiji", fiji, "--seed", str(TWS_SEED), "--quiet"], folder, f"dinofeat fiji train --set {feature_set}")
    apply_s, _ = run([dinofeat, "fiji", "apply", "tws.model", str(image), "-o", "classes.tif", "--set", feature_set,
                      "--fiji", fiji, "--quiet"], folder, f"dinofeat fiji apply --set {feature_set}")
    return Outcome(tifffile.imread(folder / "classes.tif"), train_s + apply_s, {"train_s": train_s, "apply_s": apply_s})


def tws_own(image: Path, scribbles: Path, work: Path) -> Outcome:
    """TWS's own default features and forest (seed 1), trained on the scribbles and applied to the same image
    in a JVM of its own (tests/jvm/tws_own_features.py, as tests/test_fiji_bridge.py runs it)."""
    fiji = str(fiji_dir())
    if not TWS_OWN_SCRIPT.is_file():
        raise ToolSkipped(f"{TWS_OWN_SCRIPT} is absent")
    folder = fresh(work, "tws_own")
    seconds, _ = run([sys.executable, str(TWS_OWN_SCRIPT), fiji, str(image), str(scribbles), str(TWS_SEED), "own.tif"],
                     folder, "TWS with its own features")
    return Outcome(tifffile.imread(folder / "own.tif"), seconds)


# Measuring several tools on several cases, alternating them within each repeat

@dataclass
class Inputs:
    """One labelled case as the tools get it: arrays, and the same written as TIFFs in `folder`."""

    name: str
    split: str
    image: np.ndarray
    scribbles: np.ndarray
    truth: np.ndarray
    image_file: Path
    scribbles_file: Path
    folder: Path


@dataclass
class Column:
    """One tool of a table: runs on a case's inputs in a work folder. `feature_set`: the dinofeat set it uses,
    if any; a set `dinofeat sets` does not list is tried once, and its message then fills the whole column."""

    name: str
    run: Callable[[Inputs, Path], Outcome]
    feature_set: str | None = None
    seeded: bool = True
    """Whether the tool's forest is seeded (the same mIoU every run); an unseeded one (ilastik's) varies from run to
    run, so its cell gives the spread over the repeats too."""
    everywhere: dict | None = field(default=None, repr=False)  # {"failed"|"skipped": message} for every case


def dinofeat_sets() -> list[str] | None:
    """The feature sets `dinofeat sets` lists, or None where it cannot say."""
    try:
        done = subprocess.run([dinofeat_cli(), "sets"], check=False, capture_output=True, text=True, timeout=600, env=tool_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    return names if done.returncode == 0 and names else None


def measure(columns: list[Column], cases: list[tuple[str, str, Callable]], repeats: int, work: Path,
            miou: Callable[[np.ndarray, np.ndarray], float], only_unseeded_repeat: bool = False) -> dict[str, dict]:
    """Every column on every case (name, split, loader returning a cases.Case), `repeats` times (seeded columns
    once with `only_unseeded_repeat`: their mIoU cannot change), the columns alternating within each repeat so
    that machine noise hits all alike. Returns case -> {"split", "tools":
    column -> cell}, a cell being {"miou", "seconds" (medians), "mious", "times", ["parts"]} or {"failed": why}
    or {"skipped": why}. Prints one line per case as it goes."""
    known = dinofeat_sets() if any(c.feature_set for c in columns) else None
    probing = {c.name for c in columns if c.feature_set and known is not None and c.feature_set not in known}
    rows = {}
    for name, split, load in cases:
        case = load()
        folder = work / name
        image_file, scribbles_file = write_inputs(folder, case.image, case.scribbles)
        inputs = Inputs(name, split, case.image, case.scribbles, case.truth, image_file, scribbles_file, folder)
        runs: dict[str, list[Outcome]] = {c.name: [] for c in columns}
        cells: dict[str, dict] = {}
        for repeat in range(repeats):
            for column in columns:
                if column.everywhere or column.name in cells or (repeat and column.seeded and only_unseeded_repeat):
                    continue
                try:
                    runs[column.name].append(column.run(inputs, folder))
                except ToolSkipped as why:
                    column.everywhere = {"skipped": str(why)}
                except ToolFailed as why:
                    cells[column.name] = {"failed": str(why)}
                    if column.name in probing:
                        column.everywhere = {"failed": str(why)}
        row = {}
        for column in columns:
            done = runs[column.name]
            if column.everywhere:
                row[column.name] = dict(column.everywhere)
            elif column.name in cells:
                row[column.name] = cells[column.name]
            else:
                row[column.name] = cell_of([miou(o.classes, case.truth) for o in done], [o.seconds for o in done],
                                           column.seeded)
                if done[0].parts:
                    row[column.name]["parts"] = {k: statistics.median(o.parts[k] for o in done) for k in done[0].parts}
        rows[name] = {"split": split, "tools": row}
        print(f"{name} ({split}): " + "; ".join(f"{k} {describe(v)}" for k, v in row.items()), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def cell_of(mious: list[float], times: list[float], seeded: bool) -> dict:
    """A table cell of a column's runs on one case: mIoU (the mean; of a seeded tool every run gives the same,
    of an unseeded one the mean is what a user gets on average) with its standard deviation where the forest is
    unseeded, and the median wall time."""
    cell = {"miou": statistics.mean(mious), "seconds": statistics.median(times), "mious": mious, "times": times}
    if not seeded and len(mious) > 1:
        cell["miou_sd"] = statistics.stdev(mious)
    return cell


def describe(cell: dict) -> str:
    if "miou" in cell:
        return f"mIoU {cell['miou']:.3f}, {cell['seconds']:.1f} s"
    return next(f"{k}: {v}" for k, v in cell.items())


def miou_text(cell: dict) -> str:
    """'0.643' for one run or a seeded tool, '0.643 ± 0.003' (mean ± standard deviation) for an unseeded one."""
    if "miou" not in cell:
        return next(iter(cell))
    return f"{cell['miou']:.3f} ± {cell['miou_sd']:.3f}" if "miou_sd" in cell else f"{cell['miou']:.3f}"


def time_text(cell: dict) -> str:
    return f"{cell['seconds']:.1f} s" if "seconds" in cell else next(iter(cell))


def markdown(header: list[str], lines: list[list[str]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def notes(rows: dict[str, dict]) -> list[str]:
    """One line per distinct failure or skip message: 'column: failed/skipped (cases): message'."""
    seen: dict[tuple[str, str, str], list[str]] = {}
    for case, row in rows.items():
        for column, cell in row["tools"].items():
            for kind in ("failed", "skipped"):
                if kind in cell:
                    seen.setdefault((column, kind, cell[kind]), []).append(case)
    return [f"{column}: {kind} ({', '.join(cases)}): {message}" for (column, kind, message), cases in seen.items()]


def mean_miou(rows: dict[str, dict], column: str, split: str | None = None) -> float | None:
    """Mean mIoU of a column over the cases (of `split`) where it ran; None where it ran on none."""
    values = [r["tools"][column]["miou"] for r in rows.values()
              if (split is None or r["split"] == split) and "miou" in r["tools"][column]]
    return float(np.mean(values)) if values else None
