"""Full-resolution DINOv2 features (and CLS attention maps) of one 2-D image.

Presets trade quality for time:
- `fast`: stride 14, one view, joint bilateral upsampling guided by the image;
- `default`: stride 7, 9 reflect-shifted views (3 px in 8 directions), aligned bilinear upsampling;
- `paper`: stride 4, 17 views (1 and 2 px in 8 directions), the reference's exact algorithm;
- `paper_flips`: the same with the reference's 4 flips (68 views).
DINOv3 backbones (patch 16) take the same presets at their patch: `fast` stride 16, `default` stride 8 with 4 px
shifts, `paper` and `paper_flips` stride 4 as HR-Dv2's DINOv3 path (`PATCH16_PRESETS`).
Images larger than the memory budget are cut into overlapping tiles (see `tiles.py`); each tile's
tokens are mapped into the dataset's feature space before upsampling, blended with linear ramps, and
released in strips of rows as soon as they are final, so memory depends on the tile size and the
number of output channels, not on the image size.

Tiles ahead of the one being blended may go to spare workers (`SpareWorkers`: idle compute slots of a
server, perhaps on other devices), one tile per worker at a time; results are blended in the plan's
order, so the features equal those of one worker computing every tile itself.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from typing import Protocol, TypeVar

import numpy as np
import torch
from dinofeat.contract.errors import DinofeatError

from dinofeat.contract.durations import spoken_duration

from . import anyup
from .backbone import IMAGENET_MEAN, IMAGENET_STD, DinoVisionTransformer, forward_flops, token_grid
from .dinov3 import DINOV3_BACKBONES, Dinov3Config
from .progress import Advance, run_to_end
from .lending import in_plan_order
from .tiles import TILE_OVERLAP, Tile, TileBlender, blend_order, tile_plan, tile_rows
from .views import Affine, TileOrigin, ViewSpec, view_steps
from .weights import check_device_for, file_sha256

PRESETS: dict[str, ViewSpec] = {
    "fast": ViewSpec(stride=14, upsampler="joint_bilateral"),
    "default": ViewSpec(stride=7, distances=(3,), directions=8, upsampler="bilinear"),
    "paper": ViewSpec(stride=4, distances=(1, 2), directions=8, mode="paper"),
    "paper_flips": ViewSpec(stride=4, distances=(1, 2), directions=8, flips=True, mode="paper"),
}
PATCH16_PRESETS: dict[str, ViewSpec] = {
    "fast": ViewSpec(stride=16, upsampler="joint_bilateral"),
    "default": ViewSpec(stride=8, distances=(4,), directions=8, upsampler="bilinear"),
    "paper": PRESETS["paper"],
    "paper_flips": PRESETS["paper_flips"],
}
"""The presets of the patch-16 (DINOv3) backbones: the same views at strides of the patch and half the patch."""
CPU_FLOPS_PER_THREAD = 18.5e9
"""ViT operations per second of one CPU thread, end to end (upsampling and blending included),
measured on the build machine: ViT-S at 518x518 took 2.5 s with `fast` and 138 s with `default` on
2 threads. Used only to tell users what to expect."""
ANYUP_OPS_PER_PIXEL = 1.1e6
"""AnyUp's cost per output pixel and view in the same units: 16 CPU seconds for a 512x512 image (bench_upsamplers)."""
NOTICE_SECONDS = 30.0
"""A CPU computation expected to take longer than this is announced before it starts."""
DEFAULT_BUDGET_BYTES = 1 << 30
"""Memory the tiles of one request may use unless the server derives it from its memory target."""
CELL = 256
"""Blocks are released in whole 256 x 256 cells: the (1, 256, 256) chunks of the HDF5 file."""
Block = tuple[int, int, torch.Tensor]
"""(first row, first column, features (C, rows, columns))."""
MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


def presets_for(patch: int) -> dict[str, ViewSpec]:
    """The presets of a backbone with this patch size (14: DINOv2, 16: DINOv3)."""
    return PATCH16_PRESETS if patch == 16 else PRESETS


def preset(name: str, backbone: str = "dinov2_vits14", upsampler: str = "") -> ViewSpec:
    """The views of preset `name` for `backbone` (its patch decides the strides), upsampled by `upsampler` instead of
    the preset's own where one is named ("anyup": the learned AnyUp, anyup.py)."""
    try:
        spec = presets_for(16 if backbone in DINOV3_BACKBONES else 14)[name]
    except KeyError:
        raise DinofeatError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.") from None
    if not upsampler or upsampler == spec.upsampler:
        return spec
    if spec.mode == "paper":
        raise DinofeatError(f"the {name} preset reproduces the paper's own resizing, so --upsampler {upsampler} cannot apply; "
                            "leave --upsampler out, or choose --preset fast or default.")
    return replace(spec, upsampler=upsampler)


def model_input(image: np.ndarray, device: torch.device, mean_std: MeanStd = (IMAGENET_MEAN, IMAGENET_STD)) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, X) or (Y, X, 3) intensities in [0, 1] -> normalised (1, 3, Y, X) (ImageNet's mean and std unless the
    weights want others) and a (1, 1, Y, X) guide.

    Greyscale is repeated to three channels, as the reference does (ToTensor + Normalize)."""
    planes = np.repeat(image[None], 3, axis=0) if image.ndim == 2 else np.moveaxis(image, -1, 0)
    rgb = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None].to(device)
    mean, std = (torch.tensor(values, device=device, dtype=rgb.dtype).view(1, 3, 1, 1) for values in mean_std)
    return (rgb - mean) / std, rgb.mean(dim=1, keepdim=True)


def input_normalisation(model: DinoVisionTransformer) -> MeanStd:
    """The mean and std a model's weights expect: ImageNet's, or a DINOv3 checkpoint's own (SAT-493M)."""
    return model.config.mean_std if isinstance(model.config, Dinov3Config) else (IMAGENET_MEAN, IMAGENET_STD)


def estimated_bytes(height: int, width: int, channels: int, model: DinoVisionTransformer, spec: ViewSpec, batch: int) -> int:
    """A generous estimate of the memory one tile needs: ViT activations of a batch of views plus
    the full-resolution view, accumulator and upsampling temporaries of `channels` output channels."""
    tokens = token_grid(height, model.config.patch, spec.stride) * token_grid(width, model.config.patch, spec.stride)
    activations = batch * (tokens + 5) * model.config.dim * 4 * 12
    full_resolution = channels * height * width * 4 * (4 if spec.upsampler == "joint_bilateral" else 3)
    learned = anyup.peak_bytes(height, width) if spec.upsampler == "anyup" else 0
    return activations + full_resolution + learned + 16 * height * width * 4  # input, guide and upsampling weights


MOST_VIEWS_PER_BATCH = {False: 1, True: 8}
"""Views computed in one batch at most, on a CPU (False) and a GPU (True)."""


Lent = TypeVar("Lent")


class SpareWorkers(Protocol):
    """Idle workers that one computation may borrow for one tile at a time, never waiting for one.

    A server passes this (service/device_pool.py); the engine knows nothing else of servers."""

    count: int
    """Workers that could be lent at once at most: tile results held ahead are bounded by it."""

    def lend(self, work: Callable[[DeepExtractor], Lent]) -> Future[Lent] | None:
        """Start `work(extractor)` on an idle worker (the same model on that worker's device) and return its
        future, or None at once when no worker is idle or another request waits for one. The worker goes
        back when `work` ends."""
        ...

    def computed_here(self) -> None:
        """Count one tile computed by the borrowing computation's own worker (for the server's status)."""
        ...


class DeepExtractor:
    """A loaded DINOv2 or DINOv3 model on one device, computing full-resolution features tile by tile within a memory budget."""

    def __init__(self, model: DinoVisionTransformer, device: torch.device, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 *, anyup_weights: str | None = None):
        check_device_for(model.config, device)
        self.model = model.to(device).eval()
        self.device = device
        self.budget_bytes = budget_bytes
        self.anyup_weights = anyup_weights
        """AnyUp's weights file (None: $DINOFEAT_ANYUP_WEIGHTS or the authors' release, see anyup.weights_file)."""
        self._upsampler_sha256 = ""
        self.spare: SpareWorkers | None = None

    def upsampler_sha256(self) -> str:
        """The checksum of the AnyUp weights this extractor upsamples with (hashed once): part of a space's identity, so
        a model trained with one AnyUp file is refused on features of another."""
        if not self._upsampler_sha256:
            self._upsampler_sha256 = file_sha256(anyup.weights_file(self.anyup_weights))
        return self._upsampler_sha256

    def lending(self, spare: SpareWorkers | None) -> DeepExtractor:
        """This extractor (the same loaded model), computing tiles ahead on `spare` workers while they are idle."""
        helped = copy.copy(self)
        helped.spare = spare
        return helped

    def channels(self, what: str) -> int:
        return self.model.config.heads if what == "attention" else self.model.config.dim

    def plan(self, height: int, width: int, spec: ViewSpec, channels: int) -> tuple[int, int]:
        """(tile edge, views per batch) such that one tile and the blender's accumulators fit the
        budget: the whole image if it fits, else the largest tile that does. On a CPU one view at a
        time (batching gains nothing there, and progress comes view by view).

        Tiles are never smaller than four overlaps plus a stride; a budget below what such a tile
        needs is exceeded rather than refused."""
        def needed(edge: int, batch: int) -> int:
            tile = estimated_bytes(min(edge, height), min(edge, width), channels, self.model, spec, batch)
            if edge >= max(height, width):
                return tile
            return tile + TileBlender.most_bytes(channels, tile_plan(height, width, edge, align=spec.stride), width, CELL)

        batch = min(spec.view_count(), MOST_VIEWS_PER_BATCH[self.device.type == "cuda"])
        while batch > 1 and needed(max(height, width), batch) > self.budget_bytes:
            batch //= 2
        edge = max(height, width)
        while edge > 4 * TILE_OVERLAP + spec.stride and needed(edge, batch) > self.budget_bytes:
            edge = max(int(edge * 0.9), 4 * TILE_OVERLAP + spec.stride)
        return edge, batch

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def expected_seconds(self, tiles: list[Tile], spec: ViewSpec) -> float:
        """The time `tiles` take with `spec` on this CPU, from the ViT's operations (they dominate on CPUs) and AnyUp's."""
        patch = self.model.config.patch
        flops = sum(forward_flops(self.model.config, token_grid(t.height, patch, spec.stride) * token_grid(t.width, patch, spec.stride))
                    + (ANYUP_OPS_PER_PIXEL * t.height * t.width if spec.upsampler == "anyup" else 0) for t in tiles)
        return flops * spec.view_count() / (CPU_FLOPS_PER_THREAD * torch.get_num_threads())

    def time_notice(self, tiles: list[Tile], spec: ViewSpec, height: int, width: int) -> str:
        """On a CPU, a sentence saying how long a long computation will take (and `fast`'s time); else ""."""
        return self.cpu_time_notice(f"this {height}x{width} image", tiles, spec)

    def fit_notice(self, crops: list[Tile], spec: ViewSpec, shapes: list[tuple[int, int]], channels: int) -> str:
        """On a CPU, before a feature space's fit: how long the fit on `crops` and then the features of the fitted planes
        (`shapes`, as `blocks` will tile them) take together, so the estimate comes before the fit's first view; else ""."""
        tiles = [tile for height, width in shapes for tile in tile_plan(height, width, self.plan(height, width, spec, channels)[0],
                                                                        align=spec.stride)]
        what = f"this {shapes[0][0]}x{shapes[0][1]} image" if len(shapes) == 1 else f"these {len(shapes)} planes"
        crop_count = f"{len(crops)} crop{'s' if len(crops) > 1 else ''}"
        return self.cpu_time_notice(f"fitting the feature space ({crop_count}) and then {what}", crops + tiles, spec)

    def cpu_time_notice(self, what: str, tiles: list[Tile], spec: ViewSpec) -> str:
        """On a CPU, "`what` takes about ... with preset ...", with how many times fewer operations `fast` needs, when
        `tiles` take NOTICE_SECONDS or more; else ""."""
        if self.device.type != "cpu":
            return ""
        seconds = self.expected_seconds(tiles, spec)
        if seconds < NOTICE_SECONDS:
            return ""
        presets = {n: replace(p, upsampler=spec.upsampler) if spec.upsampler == "anyup" else p  # the presets with AnyUp
                   for n, p in presets_for(self.model.config.patch).items()}
        name = next((n for n, p in presets.items() if p == spec), f"{spec.view_count()} views at stride {spec.stride}")
        sentence = f"{what} takes about {spoken_duration(seconds)} on this server's CPU with preset {name!r}"
        sentence += " and AnyUp" if spec.upsampler == "anyup" else ""
        if spec != presets["fast"]:  # a ratio of the ViT's operations: fast's other costs (upsampling, writing) weigh more
            sentence += f"; --preset fast needs about {seconds / self.expected_seconds(tiles, presets['fast']):.0f}x fewer operations"
        return sentence + " (a GPU server takes seconds)."

    def check_size(self, height: int, width: int) -> None:
        patch = self.model.config.patch
        if min(height, width) < patch:
            raise DinofeatError(f"the image is {height}x{width} pixels; {'DINOv3' if patch == 16 else 'DINOv2'} features need at least {patch}x{patch}.")

    def tile_steps(self, image: np.ndarray, tile: Tile, spec: ViewSpec, what: str, batch: int, affine: Affine = None,
                   check: Callable[[], None] = lambda: None) -> Generator[int, None, torch.Tensor]:
        """(k, h, w) float32 features of one tile of `image` (intensities about [0, 1]), on the CPU, computed
        with the whole image's token grid and mapped by `affine` (k = C without it); yields the views
        done after each batch. Inference mode and autocast hold only while a batch computes."""
        height, width = image.shape[:2]
        normalised, guide = model_input(image[tile.window], self.device, input_normalisation(self.model))
        whole = tile.height == height and tile.width == width
        origin = None if whole else TileOrigin(height, width, tile.y0, tile.x0)
        learned = anyup.loaded_upsampler(str(anyup.weights_file(self.anyup_weights)), self.device) if spec.upsampler == "anyup" else None
        steps = view_steps(self.model, normalised, guide, spec, what, batch, check, origin, affine, learned)
        while True:
            with torch.inference_mode(), self.autocast():
                try:
                    done = next(steps)
                except StopIteration as finished:
                    return finished.value[0].float().cpu()
            yield done

    def tile_features(self, image: np.ndarray, tile: Tile, spec: ViewSpec, what: str, batch: int, affine: Affine = None,
                      check: Callable[[], None] = lambda: None) -> torch.Tensor:
        """`tile_steps` run to the end: the tile's (k, h, w) features."""
        return run_to_end(self.tile_steps(image, tile, spec, what, batch, affine, check))

    def blocks(self, image: np.ndarray, spec: ViewSpec, what: str = "tokens", affine: Affine = None,
               check: Callable[[], None] = lambda: None) -> Iterator[Block | Advance]:
        """(first_row, first_column, (k, rows, columns)) blocks of whole 256 x 256 chunks covering `image`,
        each as soon as every tile touching it is blended, with an `Advance` after every tile."""
        height, width = image.shape[:2]
        self.check_size(height, width)
        channels = self.channels(what) if affine is None else affine[0].shape[0]
        edge, batch = self.plan(height, width, spec, channels)
        order = blend_order(tile_rows(tile_plan(height, width, edge, align=spec.stride)), height, width)
        tiles = [tile for tile, _, _ in order]
        blender = TileBlender(channels, height, width, CELL)
        yield Advance("tiles", 0, len(tiles), self.time_notice(tiles, spec, height, width))
        releases = iter(order)
        done = 0
        for item in self.computed_tiles(image, tiles, spec, what, batch, affine, check):
            if isinstance(item, Advance):
                yield item
                continue
            tile, until_row, until_column = next(releases)
            blender.add(tile, item)
            done += 1
            yield Advance("tiles", done, len(tiles))
            yield from blender.finished(until_row, until_column)

    def computed_tiles(self, image: np.ndarray, tiles: list[Tile], spec: ViewSpec, what: str, batch: int, affine: Affine,
                       check: Callable[[], None]) -> Iterator[Advance | torch.Tensor]:
        """Each tile's (k, h, w) features in the plan's order, with view progress between them: tiles ahead go to
        spare workers while one is idle (`lending.in_plan_order`); without spare workers, tile after tile."""
        spare, views = self.spare, spec.view_count()

        def here(number: int) -> Iterator[Advance | torch.Tensor]:
            check()
            steps = self.tile_steps(image, tiles[number], spec, what, batch, affine, check)
            views_done = 0
            while True:
                if views > 1:  # the tile's views start now, not at its first batch
                    yield Advance("views", number * views + views_done, len(tiles) * views)
                try:
                    views_done = next(steps)
                except StopIteration as finished:
                    if spare is not None:
                        spare.computed_here()
                    yield finished.value
                    return

        def lend(number: int) -> Future[list[torch.Tensor]] | None:
            tile = tiles[number]
            return spare.lend(lambda extractor: [extractor.tile_features(image, tile, spec, what, batch, affine, check)])

        return in_plan_order(len(tiles), here, lend if spare is not None else None, spare.count if spare is not None else 0,
                             lambda output: isinstance(output, Advance))

    def features(self, image: np.ndarray, spec: ViewSpec, what: str = "tokens",
                 check: Callable[[], None] = lambda: None, affine: Affine = None) -> torch.Tensor:
        """The whole (C, Y, X) float32 stack on the CPU: patch-token features (what="tokens") or CLS
        attention per head. For tests and small images; servers stream `blocks`."""
        height, width = image.shape[:2]
        out = None
        for item in self.blocks(image, spec, what, affine, check):
            if not isinstance(item, Advance):
                y0, x0, block = item
                out = torch.empty(block.shape[0], height, width) if out is None else out
                out[:, y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = block
        return out
