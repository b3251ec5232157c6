"""The napari plugin against napari-convpaint 1.2.0: time from a finished stroke to the updated class map, and mIoU.

Latency: the widget (clients/dinofeat_napari) in live mode on napari's viewer model (Qt offscreen, no torch in this
process) with a warm `dinofeat serve` process on this machine; ISB-3 at 512x512 and tiled to 2048x2048 with its
scribbles; each timed stroke is a disc of one class painted at a seeded place inside that class, and the time runs
from napari's paint event to the class map in its layer (the widget's 300 ms debounce included; the figures without
it are given too). convpaint runs the same strokes in its own process (it imports torch): after each stroke it
trains and segments the image as its widget does, with the extractor it can run offline (`gaussian`; its VGG16,
DINOv2 and other networks download weights, and `ilastik_2d` needs fastfilters from conda), its default CatBoost.
mIoU: dinofeat's default (`multiscale`, extra trees, seed 0: the widget's Segment, equal to `dinofeat segment`)
and convpaint's over the tuning and report cases of bench/cases.py, the same scribbles.

    .venv/bin/python bench/bench_napari.py [--quick | --full] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cases import REPORT, TUNING, Case  # noqa: E402
from machine import parse_args, save, skip  # noqa: E402

CONVPAINT = """
import json, sys, time, types
import numpy as np
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
# torchvision 0.28.0 from PyPI is built for CUDA: beside CPU torch its fake-kernel registrations fail on import;
# convpaint's filter extractors never call those operators
from napari_convpaint.convpaint_model import ConvpaintModel
task = json.loads(sys.argv[1])
data = np.load(task["arrays"])
out = {}
if task["kind"] == "strokes":
    image, scribbles = data["image"], data["scribbles"].copy()
    model = ConvpaintModel(alias="gaussian")  # kept between strokes, as its widget keeps it
    for y, x, r, value in data["strokes"].tolist():
        scribbles[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = value
        start = time.perf_counter()
        model.train(image, scribbles)
        model.segment(image)
        out.setdefault("seconds", []).append(time.perf_counter() - start)
else:
    for name in task["cases"]:
        model = ConvpaintModel(alias="gaussian")
        model.train(data[name + "_image"], data[name + "_scribbles"])
        np.save(task["folder"] + "/" + name + ".npy", model.segment(data[name + "_image"]))
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve() -> tuple[str, subprocess.Popen]:
    """A `dinofeat serve` process on a free loopback port, once it answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dinofeat_client.cli", "serve", "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return f"127.0.0.1:{port}", server
        time.sleep(0.2)
    server.kill()
    sys.exit("bench_napari: the dinofeat server did not start.")


def tiled(case: Case, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The case's image, scribbles and truth repeated to size x size."""
    reps = -(-size // case.image.shape[0])
    return tuple(np.tile(a, (reps, reps))[:size, :size] for a in (case.image, case.scribbles, case.truth))


def strokes(truth: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """(y, x, radius, value) of `count` small discs, each well inside one class of `truth`, classes in turn."""
    rng = np.random.default_rng(seed)
    values = [int(v) for v in np.unique(truth)]
    chosen = []
    for n in range(count):
        ys, xs = np.nonzero(truth[8:-8, 8:-8] == values[n % len(values)])
        k = rng.integers(len(ys))
        chosen.append((int(ys[k]) + 8, int(xs[k]) + 8, 3, values[n % len(values)]))
    return np.array(chosen, dtype=np.int64)


def widget_latency(address: str, image: np.ndarray, scribbles: np.ndarray, planned: np.ndarray) -> list[float]:
    """Seconds from each stroke's paint event to the widget's updated class map (live mode), after one warm-up stroke."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from napari.components import ViewerModel
    from qtpy.QtWidgets import QApplication

    from dinofeat_napari.widget import DEBOUNCE_MS, DinofeatWidget

    app = QApplication.instance() or QApplication([])
    widget = DinofeatWidget(ViewerModel())
    widget.server.setText(address)
    widget.viewer.add_image(image, name="image")
    widget.image_layer.setCurrentText("image")
    layer = widget.add_scribbles()
    layer.data = scribbles.copy()
    widget.live.setChecked(True)
    seconds = []
    for n, (y, x, r, value) in enumerate(planned.tolist()):
        before = len(widget.jobs)
        start = time.perf_counter()
        layer.paint((y, x), value)  # one finished stroke: napari's paint event
        while not (len(widget.jobs) > before and widget.jobs[-1].outcome != "running" and not widget._workers):
            app.processEvents()
            time.sleep(0.002)
        if widget.jobs[-1].outcome != "done":
            sys.exit(f"bench_napari: the widget's prediction ended {widget.jobs[-1].outcome}: {widget.status.text()}")
        if n:  # the first stroke warms the server (the image's upload and features)
            seconds.append(time.perf_counter() - start)
    widget.cancel()
    widget.close()
    assert DEBOUNCE_MS == 300
    return seconds


def convpaint(task: dict, arrays: dict[str, np.ndarray], folder: Path) -> dict | None:
    """Run CONVPAINT on `task` in its own process; None when napari-convpaint is not installed here."""
    path = folder / f"{task['kind']}.npz"
    np.savez(path, **arrays)
    run = subprocess.run([sys.executable, "-c", CONVPAINT, json.dumps({**task, "arrays": str(path), "folder": str(folder)})],
                         capture_output=True, text=True, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    if run.returncode:
        if "No module named 'napari_convpaint'" in run.stderr:
            return None
        sys.exit(f"bench_napari: convpaint failed: {run.stderr[-1500:]}")
    return json.loads(run.stdout.split("RESULT ")[-1])


def summary(seconds: list[float]) -> dict:
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3), "max_s": round(max(seconds), 3),
            "strokes": len(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="image sizes for the latency (ISB-3 tiled)")
    parser.add_argument("--strokes", type=int, default=6, help="timed strokes per size, after one warm-up stroke")
    parser.add_argument("--cases", nargs="+", default=[*TUNING, *REPORT], help="cases of bench/cases.py for the mIoU")
    args = parse_args(parser, quick={"sizes": [512], "strokes": 2, "cases": ["isb_three_phase"]})
    try:
        import napari  # noqa: F401
    except ImportError:
        skip("bench_napari", "napari is not installed here (pip install dinofeat[napari])")
    from dinofeat_client import FeatureComputation
    from dinofeat_client.metrics import mean_iou

    from dinofeat_napari.jobs import Connection, segment

    cases = {name: {**TUNING, **REPORT}[name]() for name in args.cases}
    address, server = serve()
    results: dict = {"latency": {}, "miou": {}, "convpaint": "napari-convpaint 1.2.0, gaussian extractor, CatBoost (default)"}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            isb = cases.get("isb_three_phase") or REPORT["isb_three_phase"]()
            for size in args.sizes:
                image, scribbles, truth = tiled(isb, size)
                planned = strokes(truth, args.strokes + 1)
                ours = widget_latency(address, image, scribbles, planned)
                theirs = convpaint({"kind": "strokes"}, {"image": image, "scribbles": scribbles, "strokes": planned}, folder)
                entry = {"dinofeat": {**summary(ours), "without_debounce_median_s": round(statistics.median(ours) - 0.3, 3)}}
                if theirs is not None:
                    entry["convpaint"] = summary(theirs["seconds"][1:])
                results["latency"][f"{size}x{size}"] = entry
                print(f"{size}x{size}: stroke -> class map, dinofeat {entry['dinofeat']['median_s']} s"
                      + (f", convpaint {entry['convpaint']['median_s']} s" if "convpaint" in entry else ""), flush=True)
            with Connection(server=address).client() as client:
                for name, case in cases.items():
                    ours = segment(client, case.image, case.scribbles, FeatureComputation("multiscale"), seed=0)
                    results["miou"][name] = {"dinofeat": round(mean_iou(ours.class_map, case.truth), 4)}
            arrays = {f"{name}_{part}": getattr(case, part) for name, case in cases.items() for part in ("image", "scribbles")}
            if convpaint({"kind": "miou", "cases": list(cases)}, arrays, folder) is not None:
                for name, case in cases.items():
                    results["miou"][name]["convpaint"] = round(mean_iou(np.load(folder / f"{name}.npy"), case.truth), 4)
            for name, scores in results["miou"].items():
                print(f"{name}: mIoU " + ", ".join(f"{tool} {score}" for tool, score in scores.items()), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    save("napari", results)


if __name__ == "__main__":
    main()
