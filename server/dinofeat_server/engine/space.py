"""Feature spaces: one fitted basis per dataset, applied to every tile, slice and later image.

A `FeatureSpace` holds everything that turns raw intensities and raw network features into the
numbers a classifier sees, fitted once per dataset (an image, a volume, or all training images):

- `input_range` (low, high): intensities mapped affinely so that low -> 0 and high -> 1, from robust
  percentiles of the data (a 12-bit camera in uint16 and float data use the full range); the mapped
  values are kept within +-INPUT_LIMIT, so that no filter overflows float32 (see `normalised_input`);
- `mean` (C,) and `components` (k, C): PCA of the deep features, by decreasing variance;
- `shift` and `scale` (channels,): each output channel becomes (x - shift) / scale (a robust range for
  "minmax" and the hybrid set, mean and standard deviation for "zscore").

All of it is affine, so it is applied to the tokens of each view before upsampling and blending
(upsampling, view averaging and tile blending are weighted means whose weights sum to one). Its
`identity` (feature-set spec, weights checksum, image channels) says which features it belongs to;
applying a space to other features is refused with a sentence naming the difference (the spec names the
upsampler, so a model trained on joint-bilateral features is refused on AnyUp's).

On disk and on the wire the space is a JSON object (`to_dict`); arrays are float32 in base64.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import encoded_array, space_array

SPACE_FORMAT = "dinofeat-space/1"
INPUT_PERCENTILES = (0.1, 99.9)
"""Percentiles of the dataset's intensities that become 0 and 1."""
RANGE_PERCENTILES = (0.1, 99.9)
"""Percentiles of each channel that become 0 and 1 in a robust range ("minmax", hybrid)."""
INPUT_LIMIT = 2.0**40
"""Largest magnitude of a normalised input: the filter banks multiply intensities by a few hundred and
square them (structure tensor, Hessian eigenvalues), which stays far inside float32 from here, while
intensities near the float32 maximum (3.4e38) would give inf and NaN features."""


def decoded_array(value: dict | None) -> np.ndarray | None:
    """A writable float32 copy of an array of the space JSON (decoded as the client decodes it)."""
    array = space_array(value)
    return None if array is None else array.astype(np.float32)


@dataclass(frozen=True, eq=False)
class FeatureSpace:
    """The fitted input range, PCA and per-channel scaling of one dataset's features (see module docstring)."""

    identity: dict
    input_range: tuple[float, float]
    mean: np.ndarray | None = None
    components: np.ndarray | None = None
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None

    def normalised_input(self, plane: np.ndarray) -> np.ndarray:
        """float32 intensities with the dataset's input range mapped to [0, 1] (values beyond it kept, up
        to +-INPUT_LIMIT). Computed in float32; when that overflows (intensities or a range near the
        float32 maximum) or leaves the limit, again in float64, a block of rows at a time, and clipped."""
        low, high = self.input_range
        span = max(high - low, 1e-12)
        with np.errstate(over="ignore", invalid="ignore"):
            low32, span32 = np.float32(low), np.float32(span)
            out = ((plane.astype(np.float32) - low32) / span32).astype(np.float32)
            if out.size == 0 or (np.isfinite(low32) and np.isfinite(span32) and -INPUT_LIMIT <= out.min() and out.max() <= INPUT_LIMIT):
                return out  # NaN and inf fail the comparisons
        rows = max(1, (1 << 22) // max(1, math.prod(plane.shape[1:])))
        for y in range(0, plane.shape[0], rows):
            part = (plane[y : y + rows].astype(np.float64) - low) / span
            out[y : y + rows] = np.clip(part, -INPUT_LIMIT, INPUT_LIMIT, out=part)
        return out

    def deep_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight (k, C), bias (k,)) taking raw deep features to the first k output channels, or None
        when the space leaves them unchanged."""
        if self.components is None and self.shift is None:
            return None
        if self.components is not None:
            weight = torch.from_numpy(self.components).double()
            bias = -(weight @ torch.from_numpy(self.mean).double())
        else:
            weight, bias = None, torch.zeros(len(self.scale), dtype=torch.float64)
        if self.shift is not None:
            k = len(bias)
            scale = torch.from_numpy(self.scale[:k]).double()
            bias = (bias - torch.from_numpy(self.shift[:k]).double()) / scale
            weight = torch.diag(1 / scale) if weight is None else weight / scale[:, None]
        return weight.float(), bias.float()

    def scaled(self, block: np.ndarray, first_channel: int) -> np.ndarray:
        """(c, ...) channels first_channel .. first_channel + c of the output, scaled (classical part of hybrid)."""
        if self.shift is None:
            return block
        rows = slice(first_channel, first_channel + block.shape[0])
        shape = (-1,) + (1,) * (block.ndim - 1)
        return ((block - self.shift[rows].reshape(shape)) / self.scale[rows].reshape(shape)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"format": SPACE_FORMAT, "identity": self.identity, "input_range": [float(v) for v in self.input_range],
                "mean": encoded_array(self.mean), "components": encoded_array(self.components),
                "shift": encoded_array(self.shift), "scale": encoded_array(self.scale)}

    @classmethod
    def from_dict(cls, value: dict) -> FeatureSpace:
        """The space a `to_dict` made; anything else is refused in one sentence."""
        try:
            if value.get("format") != SPACE_FORMAT:
                raise ValueError(value.get("format"))
            low, high = value["input_range"]
            return cls(dict(value["identity"]), (float(low), float(high)), decoded_array(value["mean"]),
                       decoded_array(value["components"]), decoded_array(value["shift"]), decoded_array(value["scale"]))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise DinofeatError(f"this is not a dinofeat feature space ({SPACE_FORMAT}); compute the features again "
                                "with this dinofeat to get one.") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def check_identity(self, identity: dict) -> None:
        """Refuse to express features of `identity` in this space, naming the first difference."""
        difference = identity_difference(self.identity, identity)
        if difference and difference.startswith(EARLIER):
            raise DinofeatError(f"the feature space was fitted for {difference}; compute the features (or train the "
                                "model) again with this dinofeat.")
        if difference:
            raise DinofeatError(f"the feature space was fitted for {difference}; compute the features with the same "
                                "settings and weights, or fit a new space (leave out --like).")


EARLIER = "an earlier dinofeat's"
SPEC_OPTIONS = {"normalisation": "--normalise", "input_range": "--input-range", "preset": "--preset", "pca": "--pca",
                "backbone": "--backbone", "upsampler": "--upsampler"}
"""The command-line option behind each key of a set's spec, so a difference is named as users type it."""


def identity_difference(fitted: dict, wanted: dict) -> str | None:
    """'X, not Y' for the first item that differs between two identities, or None when they agree."""
    spec_a, spec_b = with_earlier_rules(fitted.get("feature_set", {})), with_earlier_rules(wanted.get("feature_set", {}))
    if spec_a.get("name") != spec_b.get("name"):
        return f"the {spec_a.get('name')} set, not {spec_b.get('name')}"
    for key in sorted(set(spec_a) | set(spec_b)):
        if key not in spec_a and spec_a.get("name") == spec_b.get("name"):
            return f"{EARLIER} {spec_a.get('name')!r} set, which had no {key!r}"
        if spec_a.get(key) != spec_b.get(key):
            return f"{SPEC_OPTIONS.get(key, key)} {spec_a.get(key, 'none')}, not {spec_b.get(key, 'none')}"
    if fitted.get("weights_sha256") != wanted.get("weights_sha256"):
        return (f"weights with sha256 {str(fitted.get('weights_sha256'))[:12]}..., not "
                f"{str(wanted.get('weights_sha256'))[:12]}... (other weights)")
    if fitted.get("upsampler_sha256") != wanted.get("upsampler_sha256"):
        return (f"AnyUp weights with sha256 {str(fitted.get('upsampler_sha256'))[:12]}..., not "
                f"{str(wanted.get('upsampler_sha256'))[:12]}... (another --upsampler-weights file)")
    if fitted.get("image_channels") != wanted.get("image_channels"):
        return f"images with {fitted.get('image_channels')} channel(s), not {wanted.get('image_channels')}"
    return None


def with_earlier_rules(spec: dict) -> dict:
    """A set's spec with what files from before the input-range rule left implicit: deep sets (those with a
    backbone) mapped the dataset's percentiles, filter banks the type's range."""
    if not spec or "input_range" in spec:
        return spec
    return {**spec, "input_range": "dataset" if "backbone" in spec else "dtype"}


def robust_range(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per column of (N, C) samples: the robust low and high percentiles become 0 and 1
    (a column constant in the sample keeps a scale of 1)."""
    low, high = np.percentile(samples, RANGE_PERCENTILES, axis=0)
    return low.astype(np.float32), np.where(high > low, high - low, 1.0).astype(np.float32)


def standard_range(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per column: mean and standard deviation."""
    std = samples.std(axis=0, dtype=np.float64)
    return samples.mean(axis=0, dtype=np.float64).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def channel_scaling(normalisation: str, samples: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(shift, scale) of a per-channel normalisation ("minmax": robust range, "zscore") from (N, C)
    samples; (None, None) for "none" and the per-pixel "l2"."""
    if normalisation == "minmax":
        return robust_range(samples)
    if normalisation == "zscore":
        return standard_range(samples)
    return None, None


def input_range(planes: list[np.ndarray], max_samples: int = 1 << 20) -> tuple[float, float]:
    """Robust intensity range of a dataset's planes from an evenly strided sample (deterministic)."""
    per_plane = max(1, max_samples // max(len(planes), 1))
    values = []
    for plane in planes:
        flat = plane.reshape(-1)
        values.append(flat[:: max(1, flat.size // per_plane)].astype(np.float64))
    low, high = np.percentile(np.concatenate(values), INPUT_PERCENTILES)
    if high <= low:  # a constant image: keep it at its own value
        low, high = float(low) - 0.5, float(low) + 0.5
    return float(low), float(high)


def dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """The fixed input range of the classical set: 0 to the integer type's maximum, or [0, 1] for floats."""
    if dtype.kind in "ui":
        return 0.0, float(np.iinfo(dtype).max)
    return 0.0, 1.0


def fixed_range(planes: list[np.ndarray]) -> tuple[float, float]:
    """The classical sets' input range of a dataset: `dtype_range`, except for float data whose largest
    magnitude exceeds INPUT_LIMIT (filters on it would overflow float32): that is divided by the power of
    two that brings it within +-1 (exact, and recorded in the feature space like any range)."""
    low, high = dtype_range(planes[0].dtype)
    if planes[0].dtype.kind != "f":
        return low, high
    largest = max(max(float(p.max()), -float(p.min())) for p in planes)
    if not largest > INPUT_LIMIT:  # NaN never reaches here (uploads are checked), but must not scale
        return low, high
    return 0.0, math.ldexp(1.0, math.frexp(largest)[1])
