"""AnyUp against the joint bilateral upsampler on the same tokens: time and peak memory (issue 28).

The tokens are those of DINOv2 ViT-S/14 (its real architecture, random weights: the upsamplers' cost does not depend
on the weights' values) at stride 14 on a 512 or 1024 pixel square image: 384 channels on a 36 x 36 or 73 x 73 grid,
upsampled to every pixel. Each upsampler runs in its own process, which loads the saved tokens and image and then
upsamples them once: its time (wall clock, and the CPU time of all its threads, steadier on a shared machine), the
process's peak resident memory, and that peak less the memory held before the
upsampling (the upsampler's own). Rows: joint_bilateral (engine/upsample.py), anyup (engine/anyup.py, our port with
random weights of the released architecture) and, where the vendored code is there, the authors' module with its
query chunking (q_chunk_size 4096) at 512 (at 1024 its (pixels x tokens) mask alone takes 5.6 GB).

    .venv/bin/python bench/bench_upsamplers.py [--quick | --full] [--sizes 512 1024] [--device cpu] [--save]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import parse_args, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UPSAMPLERS = ("joint_bilateral", "anyup", "anyup_official")


def test_image(size: int) -> np.ndarray:
    """A smooth random texture in [0, 1] with edges, size x size."""
    rng = np.random.default_rng(size)
    coarse = rng.random((size // 16 + 1, size // 16 + 1)).astype(np.float32)
    image = np.kron(coarse, np.ones((16, 16), np.float32))[:size, :size]
    return np.clip(image + 0.05 * rng.standard_normal((size, size)).astype(np.float32), 0, 1)


def save_inputs(size: int, folder: Path) -> Path:
    """ViT-S/14 tokens of the test image at stride 14, the normalised image and its guide, saved for the runs."""
    from dinofeat_server.engine.deep import model_input
    from dinofeat_server.engine.weights import random_backbone

    normalised, guide = model_input(test_image(size), torch.device("cpu"))
    with torch.inference_mode():
        tokens = random_backbone("dinov2_vits14")(normalised, stride=14).patch_tokens.float()
    path = folder / f"inputs_{size}.pt"
    torch.save({"normalised": normalised, "guide": guide, "tokens": tokens}, path)
    return path


def upsample_once(name: str, inputs: Path, device: str) -> dict:
    """Run upsampler `name` on the saved inputs in this process: seconds, peak RSS and the peak above the start (GB)."""
    from dinofeat_server.engine.anyup import AnyUp, AnyUpUpsampler
    from dinofeat_server.engine.upsample import TokenPlacement, joint_bilateral

    saved = torch.load(inputs)
    normalised, guide, tokens = (saved[k].to(device) for k in ("normalised", "guide", "tokens"))
    size = tuple(normalised.shape[-2:])
    placement = TokenPlacement(14, 6.5, 6.5)
    torch.manual_seed(0)
    if name == "anyup":
        upsampler = AnyUpUpsampler(AnyUp().eval().to(device))
        run = lambda: upsampler(tokens, placement, size, normalised)  # noqa: E731
    elif name == "anyup_official":
        sys.path.insert(0, str(ROOT / "tests"))
        from reference_code import unpacked

        sys.path.insert(0, str(unpacked("anyup-351807a.tar.gz", "anyup-351807a")))
        from anyup.model import AnyUp as Official

        official = Official().eval().to(device)
        run = lambda: official(normalised, tokens, q_chunk_size=4096)  # noqa: E731
    else:
        run = lambda: joint_bilateral(tokens, placement, size, guide)  # noqa: E731
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with torch.inference_mode():
        out = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    peak = after.ru_maxrss * 1024
    result = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_gb": round(peak / 1e9, 2), "peak_above_start_gb": round((peak - before) / 1e9, 2),
              "output": list(out.shape)}
    if device.startswith("cuda"):
        result["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return result


def measured(name: str, inputs: Path, device: str) -> dict:
    """`upsample_once` in a fresh process, so that each peak is that upsampler's alone."""
    done = subprocess.run([sys.executable, __file__, "--one", name, str(inputs), "--device", device],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--one" in sys.argv:  # the child: one upsampler, one size
        index = sys.argv.index("--one")
        device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
        print(json.dumps(upsample_once(sys.argv[index + 1], Path(sys.argv[index + 2]), device)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--official-up-to", type=int, default=512, metavar="SIDE",
                        help="largest side the authors' module runs at (its mask grows as pixels x tokens; 0: never)")
    args = parse_args(parser, quick={"sizes": [512], "official_up_to": 0})
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            inputs = save_inputs(size, Path(folder))
            for name in UPSAMPLERS:
                if name == "anyup_official" and size > args.official_up_to:
                    continue
                row = {"size": size, "upsampler": name, "device": args.device, "channels": 384, **measured(name, inputs, args.device)}
                rows.append(row)
                print(f"{size:5d} {name:16s} " + ("failed: " + row["failed"] if "failed" in row else
                      f"{row['seconds']:7.2f} s (CPU {row['cpu_seconds']:6.2f} s)  peak RSS {row['peak_rss_gb']:5.2f} GB  (+{row['peak_above_start_gb']:.2f} GB)"
                      + (f"  GPU {row['gpu_peak_gb']:.2f} GB" if "gpu_peak_gb" in row else "")))
    save("upsamplers", {"rows": rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
