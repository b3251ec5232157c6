"""One description of a feature computation: everything that decides the numbers of a feature stack.

A `FeatureComputation` is the only form in which a feature request travels: the command line builds one
(`cli/common.py`), the Python client sends it (`to_proto`), the server reads it back (`from_proto`) and hands it
to the engine, and every file that stores features or models stores it (`to_dict`), so a later command adopts
it. Its defaults, its checks and its result-cache key live here and nowhere else.

Fields
------
feature_set : str
    The set users type (`--set`): multiscale (the default), classical, ilastik, dinov2, attention, hybrid.
backbone, preset : str
    The backbone (DINOv2 or DINOv3) and view ensemble of the deep sets (filter banks have neither: kept at the defaults).
pca : int
    PCA components of the deep features (0: every channel for dinov2 and attention, HYBRID_PCA for hybrid).
normalise : str
    none, minmax (robust 0.1-99.9 % range), zscore or l2 (per pixel), applied in the dataset's feature space.
input_range : str
    How intensities become the network's and the filters' input: "dtype" divides integers by their type's
    maximum (8-bit / 255, as the paper's ToTensor does; floats are taken as they are), "dataset" maps the
    dataset's 0.1 and 99.9 percentiles to 0 and 1. "" means the set's own rule (`input_rule`).
weights_sha256 : str
    The backbone's weights the numbers were computed with ("" before a server has computed them: whichever
    weights that server serves).
upsampler : str
    How the deep sets' tokens reach full resolution instead of the preset's own: bilinear, joint_bilateral or
    anyup (AnyUp, a learned upsampler); "" is the preset's own (fast: joint_bilateral, default: bilinear).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from dinofeat.v1 import feature_service_pb2 as pb

from .errors import DinofeatError
from .feature_sets import SETS

DEFAULT_SET = "multiscale"
"""The set of every command of the classical path (segment, train, features, arff, cluster, pca, fiji, demo):
the bank the pixel-classification tables chose (README, "Pixel classification")."""
DEEP_DEFAULT_SET = "dinov2"
"""fewshot's set: prototypes of the frozen DINOv2 encoder (seed 001) have no classical counterpart."""
DEFAULT_BACKBONE = "dinov2_vits14"
DEFAULT_PRESET = "default"
PRESETS = ("fast", "default", "paper", "paper_flips")
"""The view ensembles of the deep sets (the server's engine/deep.py PRESETS, same order)."""
REFERENCE_PRESETS = ("paper", "paper_flips")
"""Presets that reproduce the paper's own pipeline, input scaling included (ToTensor: 8-bit / 255)."""
UPSAMPLERS = ("bilinear", "joint_bilateral", "anyup")
"""What --upsampler may name (the server's engine/upsample.py and engine/anyup.py)."""
PRESET_UPSAMPLERS = {"fast": "joint_bilateral", "default": "bilinear"}
"""Each preset's own upsampler (engine/deep.py PRESETS); the paper presets resize as the paper's code does."""
NORMALISATIONS = ("none", "minmax", "zscore", "l2")
INPUT_RANGES = ("dtype", "dataset")
MAX_PCA = 1024
HYBRID_PCA = 32
"""The hybrid set's deep components when --pca is 0."""
HYBRID_NORMALISATION = "minmax"
"""The hybrid set scales every channel to the dataset's robust range, whatever --normalise says."""

DEEP_SETS = tuple(s.name for s in SETS if s.deep)
SET_NAMES = tuple(s.name for s in SETS)


@dataclass(frozen=True)
class FeatureComputation:
    """What decides a feature stack's numbers (see the module docstring for each field)."""

    feature_set: str = DEFAULT_SET
    backbone: str = DEFAULT_BACKBONE
    preset: str = DEFAULT_PRESET
    pca: int = 0
    normalise: str = "none"
    input_range: str = ""
    weights_sha256: str = ""
    upsampler: str = ""

    @property
    def deep(self) -> bool:
        return self.feature_set in DEEP_SETS

    def input_rule(self, deep: bool | None = None) -> str:
        """The input range in force for this set (or for a set that is `deep` or not): the one asked for, else
        "dtype" for the classical sets and the paper's presets (the reference divides 8-bit by 255), "dataset"
        percentiles for the other deep presets (DINOv2 sees the same contrast whatever the camera's gain and bit
        depth: a 12-bit camera in uint16 fills 6 % of the type's range)."""
        if self.input_range:
            return self.input_range
        deep = self.deep if deep is None else deep
        return "dtype" if not deep or self.preset in REFERENCE_PRESETS else "dataset"

    def checked(self) -> FeatureComputation:
        """This description with every rule filled in (`input_range`), or one sentence for the first value
        that is unknown or does not apply to its set. Classical sets keep the deep fields at their defaults."""
        if self.feature_set not in SET_NAMES:
            raise DinofeatError(f"unknown feature set {self.feature_set!r}; choose one of {', '.join(SET_NAMES)}.")
        if self.preset not in PRESETS:
            raise DinofeatError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        if self.normalise not in NORMALISATIONS:
            raise DinofeatError(f"unknown normalisation {self.normalise!r}; choose one of {', '.join(NORMALISATIONS)}.")
        if self.input_range not in ("", *INPUT_RANGES):
            raise DinofeatError(f"unknown input range {self.input_range!r}; choose dtype (the image type's range) or dataset "
                                "(its 0.1-99.9 percentiles).")
        if self.upsampler not in ("", *UPSAMPLERS):
            raise DinofeatError(f"unknown upsampler {self.upsampler!r}; choose one of {', '.join(UPSAMPLERS)}.")
        if self.upsampler and self.preset in REFERENCE_PRESETS:
            raise DinofeatError(f"the {self.preset} preset reproduces the paper's own resizing, so --upsampler {self.upsampler} "
                                "cannot apply; leave --upsampler out, or choose --preset fast or default.")
        if not 0 <= self.pca <= MAX_PCA:
            raise DinofeatError(f"the PCA size must be between 0 (no PCA) and {MAX_PCA}, not {self.pca}.")
        if not self.deep and self.pca:
            raise DinofeatError(f"--pca reduces the deep features of {', '.join(DEEP_SETS)}; the {self.feature_set} set is "
                                "a filter bank without PCA: leave --pca out, or choose --set hybrid.")
        if self.feature_set == "hybrid" and self.normalise not in ("none", HYBRID_NORMALISATION):
            raise DinofeatError(f"the hybrid set always scales each channel to the dataset's robust range (minmax), so "
                                f"--normalise {self.normalise} cannot apply; leave --normalise out, or choose --set dinov2.")
        resolved = replace(self, input_range=self.input_rule(),
                           upsampler="" if self.upsampler == PRESET_UPSAMPLERS.get(self.preset) else self.upsampler)
        if not self.deep:  # a filter bank has no backbone: one description, one key, whatever the deep fields said
            resolved = replace(resolved, backbone=DEFAULT_BACKBONE, preset=DEFAULT_PRESET, weights_sha256="", upsampler="")
        if self.feature_set == "hybrid":
            resolved = replace(resolved, normalise=HYBRID_NORMALISATION)
        return resolved

    def key(self) -> str:
        """This computation as it enters result keys (checked first, so both sides agree)."""
        return json.dumps(asdict(self.checked()), sort_keys=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> FeatureComputation:
        """A stored description; keys of a newer dinofeat are refused in one sentence, missing ones take defaults."""
        names = {f.name for f in fields(cls)}
        if not isinstance(value, dict) or set(value) - names:
            raise DinofeatError("the stored feature description is not one this dinofeat reads; update dinofeat.")
        return cls(**value)

    def to_proto(self) -> pb.FeatureOptions:
        return pb.FeatureOptions(backbone=self.backbone, preset=self.preset, pca=self.pca, normalise=self.normalise,
                                 input_range=self.input_range, weights_sha256=self.weights_sha256, upsampler=self.upsampler)

    @classmethod
    def from_proto(cls, feature_set: str, options: pb.FeatureOptions, default_set: str = DEFAULT_SET) -> FeatureComputation:
        """A request's set and options, with the defaults of fields left empty."""
        return cls(feature_set=feature_set or default_set, backbone=options.backbone or DEFAULT_BACKBONE,
                   preset=options.preset or DEFAULT_PRESET, pca=options.pca, normalise=options.normalise or "none",
                   input_range=options.input_range, weights_sha256=options.weights_sha256, upsampler=options.upsampler)

    def request_fields(self) -> dict:
        """The `feature_set` and `options` fields of a request message."""
        return {"feature_set": self.feature_set, "options": self.to_proto()}

    def differences(self, other: FeatureComputation) -> list[str]:
        """'--option A, not B' for each field where `other` (checked) differs from this (checked), in users' words."""
        mine, theirs = self.checked(), other.checked()
        said = []
        for f in fields(self):
            a, b = getattr(mine, f.name), getattr(theirs, f.name)
            if f.name == "weights_sha256" and (not a or not b):
                continue
            if a != b:
                said.append(f"{OPTION_NAMES[f.name]} {shown(f.name, a)}, not {shown(f.name, b)}")
        return said


OPTION_NAMES = {"feature_set": "--set", "backbone": "--backbone", "preset": "--preset", "pca": "--pca",
                "normalise": "--normalise", "input_range": "--input-range", "weights_sha256": "weights",
                "upsampler": "--upsampler"}
"""How users name each field: the command line's options."""


def shown(name: str, value: object) -> str:
    if name == "weights_sha256":
        return f"sha256 {str(value)[:12]}..."
    if name == "upsampler" and not value:
        return "the preset's own"
    return str(value)



def stored_computation(stored: dict | None, spec: dict | None = None) -> FeatureComputation:
    """The description a file stores under "computation"; for a file of an earlier dinofeat, which stored only its
    set's spec (name, backbone, preset, pca, normalisation), rebuilt from that with the input-range rule it was
    computed by (the dataset's percentiles for deep sets, the type's range for filter banks)."""
    if stored:
        return FeatureComputation.from_dict(stored)
    spec = spec or {}
    name = spec.get("name", DEFAULT_SET)
    deep = name in DEEP_SETS
    if not deep:
        return FeatureComputation(name, normalise=spec.get("normalisation", "none"), input_range=spec.get("input_range", "dtype"))
    return FeatureComputation(name, backbone=spec.get("backbone", DEFAULT_BACKBONE), preset=spec.get("preset", DEFAULT_PRESET),
                              pca=0 if name == "hybrid" and spec.get("pca") == HYBRID_PCA else int(spec.get("pca", 0)),
                              normalise=spec.get("normalisation", "none"), input_range=spec.get("input_range", "dataset"))
