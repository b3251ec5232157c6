"""Named feature sets: what a client asks for by name, with stable channel names and a JSON spec.

A feature set turns one 2-D plane (greyscale or RGB) into a (C, Y, X) float32 stack, in strips of
rows so that large images stream without being held whole; stacks (Z, Y, X) go slice by slice. Every
set first fits a `FeatureSpace` over the whole dataset (`fit_space`) and then expresses each plane in
it (`blocks`), so all tiles, slices and later images share one basis.

The contract of a set, as each subclass fills it in:

    channel_names(image_channels, options, models) -> list[str]      stable, human-readable
    spec(options) -> dict                                             what the numbers are (JSON)
    fit_space(planes, device, options, models, check)                 yields Advance, returns FeatureSpace
    blocks(plane, device, options, models, check, space)              yields Advance and (first_row, first_column,
                                                                      (C, rows, columns)) on 256 x 256 chunk bounds
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from typing import Literal, Protocol

import numpy as np
import torch
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.computation import HYBRID_PCA, FeatureComputation

from .classical import (
    WEKA_BLUR_FACTOR,
    WEKA_SIGMAS,
    weka_channel_names,
    weka_features,
    weka_halo,
)
from .deep import DeepExtractor, preset
from .multiscale_bank import (
    DOG_FINEST,
    MULTISCALE_SIGMAS,
    STRUCTURE_TENSOR_RATIO,
    multiscale_channel_names,
    multiscale_features,
    multiscale_halo,
)
from .ilastik_bank import ILASTIK_SCALES, ilastik_channel_names, ilastik_features, ilastik_halo
from .postprocess import PCA_BLOCK_ROWS, l2_per_pixel, principal_axes
from .progress import Advance, run_to_end
from .sampling import SAMPLE_BYTES, SAMPLE_EDGE, pixel_stride, sample_crops, sample_pixels
from .space import FeatureSpace, channel_scaling, fixed_range, input_range
from .strips import feature_strips, strip_rows
from .tiles import Tile
from .weights import official_config

RGB_CHANNEL_NAMES = ("red", "green", "blue")




class Models(Protocol):
    """Where deep sets get their loaded model (one per backbone and device, see engine/models.py)."""

    def extractor(self, backbone: str) -> DeepExtractor: ...

    def weights_sha256(self, backbone: str) -> str: ...


Check = Callable[[], None]
Block = tuple[int, int, np.ndarray]
"""(first row, first column, features (C, rows, columns)), on whole 256 x 256 chunks."""
Fit = Generator[Advance, None, FeatureSpace]


def no_check() -> None:
    return None


def plane_channels(plane: np.ndarray) -> int:
    """Channels of one plane: 3 for (Y, X, 3), else 1."""
    return 3 if plane.ndim == 3 else 1


class FeatureSet:
    """A named way of turning one 2-D plane (Y, X) or (Y, X, 3) into a (C, Y, X) float32 stack."""

    name: str
    description: str
    deep: bool = False

    def channel_names(self, image_channels: int, options: FeatureComputation = FeatureComputation(), models: Models | None = None) -> list[str]:
        raise NotImplementedError

    def spec(self, options: FeatureComputation = FeatureComputation()) -> dict:
        raise NotImplementedError

    def identity(self, image_channels: int, options: FeatureComputation = FeatureComputation(), models: Models | None = None) -> dict:
        """What a feature space of this set belongs to: the full spec, the weights (AnyUp's too, where it upsamples)
        and the image channels."""
        spec = self.spec(options)
        identity = {"feature_set": spec, "weights_sha256": self.weights_sha256(options, models), "image_channels": image_channels}
        if spec.get("upsampler") == "anyup" and models is not None:
            identity["upsampler_sha256"] = models.extractor(options.backbone).upsampler_sha256()
        return identity

    def weights_sha256(self, options: FeatureComputation, models: Models | None) -> str:
        """The checksum of the weights this set computes with ("" for a filter bank or without models)."""
        return models.weights_sha256(options.backbone) if self.deep and models is not None else ""

    def described(self, options: FeatureComputation, space: FeatureSpace) -> dict:
        """The whole description of a computation of this set in `space`, as files store it: checked, with the
        weights the space was fitted with."""
        checked = replace(options, feature_set=self.name).checked()
        return {**checked.to_dict(), "weights_sha256": space.identity.get("weights_sha256", "") if self.deep else ""}

    def fit_space(self, planes: list[np.ndarray], device: torch.device, options: FeatureComputation = FeatureComputation(),
                  models: Models | None = None, check: Check = no_check) -> Fit:
        """Fit the space of a dataset given as its raw 2-D planes; yields progress, returns the space."""
        raise NotImplementedError

    def blocks(self, plane: np.ndarray, device: torch.device, options: FeatureComputation, models: Models | None, check: Check,
               space: FeatureSpace) -> Iterator[Block | Advance]:
        """Yield blocks covering the raw plane, expressed in `space`, and progress."""
        raise NotImplementedError

    def fitted_space(self, planes: list[np.ndarray], device: torch.device | str = "cpu", options: FeatureComputation = FeatureComputation(),
                     models: Models | None = None) -> FeatureSpace:
        """`fit_space` without the progress."""
        return run_to_end(self.fit_space(planes, torch.device(device), options, models))

    def compute(self, image: np.ndarray, device: torch.device | str = "cpu", options: FeatureComputation = FeatureComputation(),
                models: Models | None = None, space: FeatureSpace | None = None) -> np.ndarray:
        """The whole (C, Y, X) stack of one 2-D plane, in `space` (by default fitted on the plane itself)."""
        device = torch.device(device)
        space = space or self.fitted_space([image], device, options, models)
        out = None
        for item in self.blocks(image, device, options, models, no_check, space):
            if not isinstance(item, Advance):
                y0, x0, block = item
                out = np.empty((block.shape[0], *image.shape[:2]), np.float32) if out is None else out
                out[:, y0 : y0 + block.shape[1], x0 : x0 + block.shape[2]] = block
        return out


def dataset_input_range(planes: list[np.ndarray], options: FeatureComputation, deep: bool) -> tuple[float, float]:
    """The intensities that become 0 and 1, by the computation's input rule: the type's range ("dtype": 8-bit / 255,
    as the paper's ToTensor) or the dataset's robust percentiles ("dataset")."""
    return fixed_range(planes) if options.input_rule(deep) == "dtype" else input_range(planes)


def bank_input(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(Y, X) or (Y, X, C) intensities -> the (1, C, Y, X) float32 tensor a filter bank takes."""
    planes = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None].to(device)


class NormalisedPlane:
    """A raw plane seen through a space's input range, normalised one window at a time (no whole copy)."""

    def __init__(self, plane: np.ndarray, space: FeatureSpace):
        self.plane, self.space, self.shape, self.ndim = plane, space, plane.shape, plane.ndim

    def __getitem__(self, window) -> np.ndarray:
        return self.space.normalised_input(self.plane[window])


class ClassicalSet(FeatureSet):
    """A bank of local filters, computed exactly in strips of rows: K channels per image channel.

    Its space is fixed, not fitted: integer images are divided by their type's maximum, floats kept (unless
    they are too large for float32 filters, see space.fixed_range)."""

    def __init__(self, name: str, description: str, names_per_channel: tuple[str, ...], halo: int,
                 bank: Callable[[torch.Tensor], torch.Tensor], parameters: dict):
        self.name, self.description = name, description
        self.names_per_channel, self.halo, self.bank, self.parameters = names_per_channel, halo, bank, parameters

    def channel_names(self, image_channels: int, options: FeatureComputation = FeatureComputation(), models: Models | None = None) -> list[str]:
        if image_channels == 1:
            return list(self.names_per_channel)
        return [f"{RGB_CHANNEL_NAMES[c]}_{n}" for c in range(image_channels) for n in self.names_per_channel]

    def spec(self, options: FeatureComputation = FeatureComputation()) -> dict:
        normalisation = {"normalisation": options.normalise} if options.normalise != "none" else {}
        return {"name": self.name, **self.parameters, **normalisation, "input_range": options.input_rule(deep=False)}

    def fit_space(self, planes: list[np.ndarray], device: torch.device, options: FeatureComputation = FeatureComputation(),
                  models: Models | None = None, check: Check = no_check) -> Fit:
        """The fixed input range of the planes' type; per-channel scaling ("minmax", "zscore") fitted on sample crops."""
        space = FeatureSpace(self.identity(plane_channels(planes[0]), options, models), dataset_input_range(planes, options, self.deep))
        if options.normalise not in ("minmax", "zscore"):
            return space
        crops = sample_crops([p.shape[:2] for p in planes])
        per_crop = max(1, SAMPLE_BYTES // (4 * len(self.channel_names(plane_channels(planes[0])))) // len(crops))
        samples = []
        for number, (z, crop) in enumerate(crops):
            check()
            samples.append(sample_pixels(self.crop(NormalisedPlane(planes[z], space), crop, device), pixel_stride(crop, per_crop)))
            yield Advance("fitting the feature space", number + 1, len(crops))
        shift, scale = channel_scaling(options.normalise, np.concatenate(samples))
        return FeatureSpace(space.identity, space.input_range, shift=shift, scale=scale)

    def blocks(self, plane: np.ndarray, device: torch.device, options: FeatureComputation = FeatureComputation(),
               models: Models | None = None, check: Check = no_check, space: FeatureSpace | None = None,
               rows: int = 0) -> Iterator[Block]:
        """Strips of `rows` rows across the whole width (the bank is exact in strips; 0: `strip_rows`)."""
        rows = rows or strip_rows(plane.shape[0], plane.shape[1], len(self.channel_names(plane_channels(plane))), self.halo)
        image = space.normalised_input(plane) if space else plane.astype(np.float32)
        for y0, block in self.bank_strips(image, device, check, rows):
            block = space.scaled(block, 0) if space else block
            yield y0, 0, (l2_per_pixel(torch.from_numpy(block)).numpy() if options.normalise == "l2" else block)

    def bank_strips(self, image: np.ndarray, device: torch.device, check: Check, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """The bank of a plane already in [0, 1], in strips of `rows` rows."""
        tensor = bank_input(image, device)
        with torch.inference_mode():
            for y0, block in feature_strips(self.bank, tensor, self.halo, rows):
                check()
                yield y0, block.reshape(-1, *block.shape[-2:]).cpu().numpy()

    def crop(self, image: np.ndarray | NormalisedPlane, crop: Tile, device: torch.device) -> np.ndarray:
        """The bank's (C, h, w) output on one crop of a plane in [0, 1], equal to the whole plane's there."""
        y0, x0 = max(crop.y0 - self.halo, 0), max(crop.x0 - self.halo, 0)
        y1 = min(crop.y0 + crop.height + self.halo, image.shape[0])
        x1 = min(crop.x0 + crop.width + self.halo, image.shape[1])
        with torch.inference_mode():
            out = self.bank(bank_input(image[y0:y1, x0:x1], device))
        out = out.reshape(-1, *out.shape[-2:]).cpu().numpy()
        return out[:, crop.y0 - y0 : crop.y0 - y0 + crop.height, crop.x0 - x0 : crop.x0 - x0 + crop.width]


CLASSICAL = ClassicalSet(
    name="classical",
    description="Trainable-Weka-like filter bank: raw, Sobel, Hessian, Gaussian, DoG, membrane projections",
    names_per_channel=tuple(weka_channel_names(WEKA_SIGMAS)),
    halo=weka_halo(WEKA_SIGMAS),
    bank=weka_features,
    parameters={"bank": "weka", "sigmas": list(WEKA_SIGMAS), "blur_factor": WEKA_BLUR_FACTOR, "membrane_size": 19,
                "membrane_angles": 30, "border": "mirror"},
)


MULTISCALE = ClassicalSet(
    name="multiscale",
    description="the default bank: Gaussian, gradient magnitude, Hessian and structure-tensor eigenvalues at "
                "sigma 0.5-16, differences of Gaussians",
    names_per_channel=tuple(multiscale_channel_names()),
    halo=multiscale_halo(),
    bank=multiscale_features,
    parameters={"bank": "multiscale", "sigmas": list(MULTISCALE_SIGMAS), "structure_tensor_ratio": STRUCTURE_TENSOR_RATIO,
                "dog_finest": DOG_FINEST, "border": "mirror"},
)
ILASTIK = ClassicalSet(
    name="ilastik",
    description="ilastik's Pixel Classification features, all 37 (Gaussian, LoG, gradient magnitude, DoG, "
                "structure tensor and Hessian eigenvalues at sigma 0.3-10), computed as ilastik does",
    names_per_channel=tuple(ilastik_channel_names()),
    halo=ilastik_halo(),
    bank=ilastik_features,
    parameters={"bank": "ilastik", "scales": list(ILASTIK_SCALES), "ilastik": "1.4 with fastfilters", "border": "mirror"},
)


class DeepSet(FeatureSet):
    """DINOv2 tokens or attention, tiled, mapped into the dataset's space before upsampling (see the subclasses)."""

    deep = True
    what: Literal["tokens", "attention"] = "tokens"
    with_classical = False
    """Whether the classical bank of the same pixels follows the deep channels (hybrid)."""

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description

    def components(self, options: FeatureComputation) -> int:
        """PCA components of the deep part (0: all channels)."""
        return options.pca

    def normalisation(self, options: FeatureComputation) -> str:
        return options.normalise

    def deep_names(self, models: Models | None, options: FeatureComputation) -> list[str]:
        config = models.extractor(options.backbone).model.config if models else official_config(options.backbone)
        k = min(self.components(options), config.dim)
        return [f"dino_pca_{i:02d}" for i in range(k)] if k else [f"dino_{i:03d}" for i in range(config.dim)]

    def channel_names(self, image_channels: int, options: FeatureComputation = FeatureComputation(), models: Models | None = None) -> list[str]:
        return self.deep_names(models, options)

    def spec(self, options: FeatureComputation = FeatureComputation()) -> dict:
        view = preset(options.preset, options.backbone, options.upsampler)
        return {"name": self.name, "backbone": options.backbone, "preset": options.preset, "stride": view.stride,
                "views": view.view_count(), "view_mode": view.mode, "upsampler": view.upsampler,
                "pca": self.components(options), "normalisation": self.normalisation(options), "input_range": options.input_rule(deep=True)}

    def needs_sample(self, options: FeatureComputation) -> bool:
        return bool(self.components(options)) or self.normalisation(options) in ("minmax", "zscore")

    def fit_space(self, planes: list[np.ndarray], device: torch.device, options: FeatureComputation = FeatureComputation(),
                  models: Models | None = None, check: Check = no_check) -> Fit:
        """Input range from all planes; PCA and channel scaling from the deep features of sample crops."""
        identity = self.identity(plane_channels(planes[0]), options, models)
        space = FeatureSpace(identity, dataset_input_range(planes, options, self.deep))
        if not self.needs_sample(options):
            return space
        extractor = models.extractor(options.backbone)
        deep, classical = yield from self.sample(planes, space, extractor, device, options, check)
        mean = components = None
        k = self.components(options)
        if k:
            mean, components = principal_axes(deep, k)
            deep = np.concatenate([(part - mean) @ components.T for part in np.array_split(deep, max(1, len(deep) // PCA_BLOCK_ROWS))])
        scaled = np.concatenate([deep, classical], axis=1) if classical is not None else deep
        shift, scale = channel_scaling(self.normalisation(options), scaled)
        return FeatureSpace(identity, space.input_range, mean, components, shift, scale)

    def sample(self, planes: list[np.ndarray], space: FeatureSpace, extractor: DeepExtractor, device: torch.device,
               options: FeatureComputation, check: Check) -> Generator[Advance, None, tuple[np.ndarray, np.ndarray | None]]:
        """(N, C) raw deep feature vectors (and (N, K) classical ones for hybrid) at the sample's pixels."""
        spec, channels = preset(options.preset, options.backbone, options.upsampler), extractor.channels(self.what)
        edge, batch = extractor.plan(SAMPLE_EDGE, SAMPLE_EDGE, spec, channels)
        crops = sample_crops([p.shape[:2] for p in planes], min(edge, SAMPLE_EDGE))
        per_crop = max(1, SAMPLE_BYTES // (4 * channels) // len(crops))
        deep, classical = [], []
        views = spec.view_count()  # progress counts views, so a one-crop fit of a many-view preset moves too
        notice = extractor.fit_notice([crop for _, crop in crops], spec, [p.shape[:2] for p in planes], channels)  # before the fit
        yield Advance("fitting the feature space", 0, len(crops) * views, notice)
        for number, (z, crop) in enumerate(crops):
            check()
            plane = NormalisedPlane(planes[z], space)
            extractor.check_size(*plane.shape[:2])
            steps = extractor.tile_steps(plane, crop, spec, self.what, batch, None, check)
            while True:
                try:
                    views_done = next(steps)
                except StopIteration as finished:
                    features = finished.value.numpy()
                    break
                yield Advance("fitting the feature space", number * views + views_done, len(crops) * views)
            stride = pixel_stride(crop, per_crop)
            deep.append(sample_pixels(features, stride))
            if self.with_classical:
                classical.append(sample_pixels(CLASSICAL.crop(plane, crop, device), stride))
            yield Advance("fitting the feature space", (number + 1) * views, len(crops) * views)
        return np.concatenate(deep), (np.concatenate(classical) if classical else None)

    def blocks(self, plane: np.ndarray, device: torch.device, options: FeatureComputation, models: Models | None, check: Check,
               space: FeatureSpace) -> Iterator[Block | Advance]:
        """The extractor's blended blocks in the space (hybrid: beside the classical bank of the same pixels)."""
        if models is None:
            raise ValueError("deep feature sets need loaded models")
        extractor = models.extractor(options.backbone)
        normalised = NormalisedPlane(plane, space)
        k = len(self.deep_names(models, options))
        for item in extractor.blocks(normalised, preset(options.preset, options.backbone, options.upsampler), self.what, space.deep_affine(), check):
            if isinstance(item, Advance):
                yield item
                continue
            y0, x0, block = item
            if self.normalisation(options) == "l2":
                block = l2_per_pixel(block)
            block = block.numpy()
            if self.with_classical:
                bank = CLASSICAL.crop(normalised, Tile(y0, x0, block.shape[1], block.shape[2]), device)
                block = np.concatenate([block, space.scaled(bank, k)])
            yield y0, x0, block


class DinoSet(DeepSet):
    """DINOv2 patch features at full resolution, optionally PCA-reduced and normalised."""


class AttentionSet(DeepSet):
    """Last-block CLS attention of DINOv2, one channel per head."""

    what = "attention"

    def deep_names(self, models: Models | None, options: FeatureComputation) -> list[str]:
        config = models.extractor(options.backbone).model.config if models else official_config(options.backbone)
        k = min(self.components(options), config.heads)
        return [f"attn_pca_{i:02d}" for i in range(k)] if k else [f"attn_h{h}" for h in range(config.heads)]


class HybridSet(DeepSet):
    """DINOv2 PCA (32 components by default) beside the classical bank, every channel in the dataset's robust range."""

    with_classical = True

    def components(self, options: FeatureComputation) -> int:
        return options.pca or HYBRID_PCA

    def normalisation(self, options: FeatureComputation) -> str:
        return "minmax"

    def channel_names(self, image_channels: int, options: FeatureComputation = FeatureComputation(), models: Models | None = None) -> list[str]:
        return self.deep_names(models, options) + CLASSICAL.channel_names(image_channels)

    def spec(self, options: FeatureComputation = FeatureComputation()) -> dict:
        bank = {key: value for key, value in CLASSICAL.spec().items() if key != "input_range"}  # the hybrid's own range rules
        return {**super().spec(options), "classical": bank}


def intensity_scaled(image: np.ndarray) -> np.ndarray:
    """float32 intensities: integer images divided by their type's maximum (8-bit -> [0, 1]), floats unchanged
    unless too large for float32 filters (the classical set's fixed input range, space.fixed_range)."""
    return FeatureSpace({}, fixed_range([image])).normalised_input(image)


FEATURE_SETS: dict[str, FeatureSet] = {
    "multiscale": MULTISCALE,
    "classical": CLASSICAL,
    "ilastik": ILASTIK,
    "dinov2": DinoSet("dinov2", "DINOv2 patch features at full resolution (optionally PCA-reduced)"),
    "attention": AttentionSet("attention", "DINOv2 last-block CLS attention, one channel per head"),
    "hybrid": HybridSet("hybrid", f"DINOv2 PCA-{HYBRID_PCA} + classical bank, each channel in the dataset's robust range"),
}


def feature_set(name: str) -> FeatureSet:
    """Look a feature set up by name; the error lists the known ones."""
    try:
        return FEATURE_SETS[name]
    except KeyError:
        raise DinofeatError(f"unknown feature set {name!r}; choose one of {', '.join(FEATURE_SETS)}.") from None
