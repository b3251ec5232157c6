"""Named feature sets: what a client asks for by name, with stable channel names and a JSON spec.

A feature set turns one 2-D image (greyscale or RGB) into a (C, Y, X) float32 stack, in strips of
rows so that large images stream without being held whole; stacks (Z, Y, X) go slice by slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from dinofeat_client.errors import DinofeatError
from dinofeat_client.wire import DEFAULT_BACKBONE, DEFAULT_PRESET, options_key

from .classical import (
    WEKA_BLUR_FACTOR,
    WEKA_SIGMAS,
    weka_channel_names,
    weka_features,
    weka_halo,
)
from .deep import DeepExtractor, preset
from .postprocess import NORMALISATIONS, fit_pca, min_max
from .strips import STRIP_ROWS, feature_strips
from .weights import official_config

RGB_CHANNEL_NAMES = ("red", "green", "blue")


@dataclass(frozen=True)
class FeatureOptions:
    """Choices of the deep sets (the classical set ignores them)."""

    backbone: str = DEFAULT_BACKBONE
    preset: str = DEFAULT_PRESET
    pca: int = 0  # dinov2: 0 keeps every channel; hybrid: 0 means HYBRID_PCA
    normalise: str = "none"  # dinov2 and attention: none, minmax, zscore or l2 (after PCA)

    def key(self) -> str:
        """These options as they enter result keys (see dinofeat_client.wire.options_key)."""
        return options_key(self.backbone, self.preset, self.pca, self.normalise)


HYBRID_PCA = 32


class Models(Protocol):
    """Where deep sets get their loaded model (one per backbone and device, see service.models)."""

    def extractor(self, backbone: str) -> DeepExtractor: ...

    def weights_sha256(self, backbone: str) -> str: ...


Check = Callable[[], None]


def no_check() -> None:
    return None


class FeatureSet:
    """A named way of turning one 2-D image (Y, X) or (Y, X, 3) in [0, 1] into a (C, Y, X) float32 stack."""

    name: str
    description: str
    deep: bool = False

    def channel_names(self, image_channels: int, options: FeatureOptions = FeatureOptions(), models: Models | None = None) -> list[str]:
        raise NotImplementedError

    def spec(self, options: FeatureOptions = FeatureOptions()) -> dict:
        raise NotImplementedError

    def strips(self, image: np.ndarray, device: torch.device, options: FeatureOptions = FeatureOptions(),
               models: Models | None = None, check: Check = no_check) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, features (C, rows, X)) covering the image."""
        raise NotImplementedError

    def compute(self, image: np.ndarray, device: torch.device | str = "cpu", options: FeatureOptions = FeatureOptions(),
                models: Models | None = None) -> np.ndarray:
        """The whole (C, Y, X) stack of one 2-D image."""
        return np.concatenate([b for _, b in self.strips(image, torch.device(device), options, models)], axis=1)


class ClassicalSet(FeatureSet):
    """A bank of local filters, computed exactly in strips of rows: K channels per image channel."""

    def __init__(self, name: str, description: str, names_per_channel: tuple[str, ...], halo: int,
                 bank: Callable[[torch.Tensor], torch.Tensor], parameters: dict):
        self.name, self.description = name, description
        self.names_per_channel, self.halo, self.bank, self.parameters = names_per_channel, halo, bank, parameters

    def channel_names(self, image_channels: int, options: FeatureOptions = FeatureOptions(), models: Models | None = None) -> list[str]:
        if image_channels == 1:
            return list(self.names_per_channel)
        return [f"{RGB_CHANNEL_NAMES[c]}_{n}" for c in range(image_channels) for n in self.names_per_channel]

    def spec(self, options: FeatureOptions = FeatureOptions()) -> dict:
        return {"name": self.name, **self.parameters}

    def strips(self, image: np.ndarray, device: torch.device, options: FeatureOptions = FeatureOptions(),
               models: Models | None = None, check: Check = no_check, rows: int = STRIP_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        planes = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        tensor = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None].to(device)
        with torch.inference_mode():
            for y0, block in feature_strips(self.bank, tensor, self.halo, rows):
                check()
                yield y0, block.reshape(-1, *block.shape[-2:]).cpu().numpy()


CLASSICAL = ClassicalSet(
    name="classical",
    description="Trainable-Weka-like filter bank: raw, Sobel, Hessian, Gaussian, DoG, membrane projections",
    names_per_channel=tuple(weka_channel_names(WEKA_SIGMAS)),
    halo=weka_halo(WEKA_SIGMAS),
    bank=weka_features,
    parameters={"bank": "weka", "sigmas": list(WEKA_SIGMAS), "blur_factor": WEKA_BLUR_FACTOR, "membrane_size": 19,
                "membrane_angles": 30, "border": "mirror"},
)


class DeepSet(FeatureSet):
    """DINOv2 features ("dinov2"), CLS attention per head ("attention"), or deep PCA + classical ("hybrid")."""

    deep = True

    def __init__(self, kind: str, description: str):
        self.name = self.kind = kind
        self.description = description

    def components(self, options: FeatureOptions) -> int:
        """PCA components of the deep part (0: all channels)."""
        if self.kind == "hybrid":
            return options.pca or HYBRID_PCA
        return options.pca

    def channel_names(self, image_channels: int, options: FeatureOptions = FeatureOptions(), models: Models | None = None) -> list[str]:
        config = models.extractor(options.backbone).model.config if models else official_config(options.backbone)
        if self.kind == "attention":
            return [f"attn_h{h}" for h in range(config.heads)]
        k = self.components(options)
        deep = [f"dino_pca_{i:02d}" for i in range(k)] if k else [f"dino_{i:03d}" for i in range(config.dim)]
        if self.kind == "hybrid":
            return deep + CLASSICAL.channel_names(image_channels)
        return deep

    def spec(self, options: FeatureOptions = FeatureOptions()) -> dict:
        view = preset(options.preset)
        spec = {"name": self.name, "backbone": options.backbone, "preset": options.preset, "stride": view.stride,
                "views": view.view_count(), "view_mode": view.mode, "upsampler": view.upsampler, "pca": self.components(options),
                "normalisation": "minmax" if self.kind == "hybrid" else options.normalise}
        if self.kind == "hybrid":
            spec.update(classical=CLASSICAL.spec())
        return spec

    def features(self, image: np.ndarray, device: torch.device, options: FeatureOptions, models: Models, check: Check) -> torch.Tensor:
        """The whole (C, Y, X) stack: deep features are not local, so no exact strips."""
        if models is None:
            raise ValueError("deep feature sets need loaded models")
        extractor = models.extractor(options.backbone)
        what = "attention" if self.kind == "attention" else "tokens"
        deep = extractor.features(image, preset(options.preset), what, check)
        k = self.components(options)
        if k:
            deep = fit_pca(deep, k).apply(deep)
        if self.kind != "hybrid":
            return NORMALISATIONS[options.normalise](deep)
        classical = torch.from_numpy(CLASSICAL.compute(image, device))
        return torch.cat([min_max(deep), min_max(classical)])

    def strips(self, image: np.ndarray, device: torch.device, options: FeatureOptions = FeatureOptions(),
               models: Models | None = None, check: Check = no_check, rows: int = STRIP_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        stack = self.features(image, device, options, models, check).numpy()
        for y0 in range(0, stack.shape[1], rows):
            yield y0, stack[:, y0 : y0 + rows]


def intensity_scaled(image: np.ndarray) -> np.ndarray:
    """float32 intensities: integer images divided by their type's maximum (8-bit -> [0, 1]), floats unchanged."""
    if image.dtype.kind in "ui":
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    return image.astype(np.float32)


FEATURE_SETS: dict[str, FeatureSet] = {
    "classical": CLASSICAL,
    "dinov2": DeepSet("dinov2", "DINOv2 patch features at full resolution (optionally PCA-reduced)"),
    "attention": DeepSet("attention", "DINOv2 last-block CLS attention, one channel per head"),
    "hybrid": DeepSet("hybrid", f"DINOv2 PCA-{HYBRID_PCA} + classical bank, each channel min-max scaled"),
}


def feature_set(name: str) -> FeatureSet:
    """Look a feature set up by name; the error lists the known ones."""
    try:
        return FEATURE_SETS[name]
    except KeyError:
        raise DinofeatError(f"unknown feature set {name!r}; choose one of {', '.join(FEATURE_SETS)}.") from None
