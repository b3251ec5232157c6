"""Named feature sets: what a client asks for by name, with stable channel names and a JSON spec.

A feature set turns one 2-D image (greyscale or RGB) into a (C, Y, X) float32 stack, in strips of
rows so that large images stream without being held whole; stacks (Z, Y, X) go slice by slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .classical import WEKA_BLUR_FACTOR, WEKA_SIGMAS, weka_channel_names, weka_features, weka_halo
from .strips import STRIP_ROWS, feature_strips

RGB_CHANNEL_NAMES = ("red", "green", "blue")


@dataclass(frozen=True)
class FeatureSet:
    """A named bank of local filters: (N, C, H, W) -> (N, C, K, H, W), K channels per image channel."""

    name: str
    description: str
    names_per_channel: tuple[str, ...]
    halo: int
    bank: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    parameters: dict = field(default_factory=dict)

    def spec(self) -> dict:
        """What identifies the numbers this set produces (stored with every result)."""
        return {"name": self.name, **self.parameters}

    def channel_names(self, image_channels: int) -> list[str]:
        if image_channels == 1:
            return list(self.names_per_channel)
        return [f"{RGB_CHANNEL_NAMES[c]}_{n}" for c in range(image_channels) for n in self.names_per_channel]

    def strips(self, image: np.ndarray, device: torch.device, rows: int = STRIP_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, features (C, rows, X) float32) over one 2-D image (Y, X) or (Y, X, 3)."""
        planes = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        tensor = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None].to(device)
        with torch.inference_mode():
            for y0, block in feature_strips(self.bank, tensor, self.halo, rows):
                yield y0, block.reshape(-1, *block.shape[-2:]).cpu().numpy()

    def compute(self, image: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
        """The whole (C, Y, X) stack of one 2-D image (convenient for small images and tests)."""
        return np.concatenate([block for _, block in self.strips(image, torch.device(device))], axis=1)


def intensity_scaled(image: np.ndarray) -> np.ndarray:
    """float32 intensities: integer images divided by their type's maximum (8-bit -> [0, 1]), floats unchanged."""
    if image.dtype.kind in "ui":
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    return image.astype(np.float32)


FEATURE_SETS: dict[str, FeatureSet] = {
    "classical": FeatureSet(
        name="classical",
        description="Trainable-Weka-like filter bank: raw, Sobel, Hessian, Gaussian, DoG, membrane projections",
        names_per_channel=tuple(weka_channel_names(WEKA_SIGMAS)),
        halo=weka_halo(WEKA_SIGMAS),
        bank=weka_features,
        parameters={"bank": "weka", "sigmas": list(WEKA_SIGMAS), "blur_factor": WEKA_BLUR_FACTOR, "membrane_size": 19,
                    "membrane_angles": 30, "border": "mirror"},
    ),
}


def feature_set(name: str) -> FeatureSet:
    """Look a feature set up by name; the KeyError's message lists the known ones."""
    try:
        return FEATURE_SETS[name]
    except KeyError:
        raise KeyError(f"unknown feature set {name!r}; choose one of {', '.join(FEATURE_SETS)}") from None
