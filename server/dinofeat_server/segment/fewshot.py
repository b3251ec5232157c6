"""Training-free 1-way k-shot segmentation with adaptive local prototypes (ALP, seed 001).

Support features are average-pooled over windows of `window` x `window` grid cells; a window whose
mask is more than 95 % foreground gives a local foreground prototype (more than 95 % background: a
local background prototype). Each class also gets a class-level prototype, the masked mean, so small
objects still have one. A query cell's logit for a class fuses its similarities to that class's
prototypes, s_k = 20 cos(f, p_k), as sum_k softmax_k(s) s_k. Logits [background, foreground] are
upsampled to the image; with several shots the foreground logit is the maximum over shots and the
background logit the mean. Connected-component analysis then keeps the most confident component
(seed 001's post-processing) when the support masks show one solid object, and every component
otherwise: keeping one is right for an organ, wrong for a membrane network or scattered particles,
whose correct prediction is many pieces (`components="auto"`; "most_confident" or "all" force either).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from dinofeat.contract.errors import DinofeatError
from dinofeat.contract.wire import DEFAULT_WINDOW
from scipy import ndimage
from scipy.spatial import ConvexHull

SIMILARITY_SCALE = 20.0
PURITY = 0.95
COMPONENT_CHOICES = ("auto", "most_confident", "all")
"""Which predicted components a query keeps: chosen from the support masks, the most confident, or all."""
MAJOR_COMPONENT = 0.1
"""Support components smaller than this share of the largest are labelling specks, not objects."""
SOLID = 0.4
"""Least solidity (area / convex-hull area) of one object: EM membrane networks measure 0.19-0.26,
a continuous phase with holes 0.52, a disk 1."""


def class_prototypes(features: torch.Tensor, mask: torch.Tensor, window: int, purity: float = PURITY) -> torch.Tensor:
    """Local prototypes (windows > `purity` inside `mask`) then the class-level prototype: (P, C).

    features (C, h, w) on the feature grid; mask (h, w) in [0, 1] (the share of each cell in the class).
    """
    pooled = F.avg_pool2d(features[None], window, stride=window, ceil_mode=False)[0]
    share = F.avg_pool2d(mask[None, None], window, stride=window, ceil_mode=False)[0, 0]
    local = pooled[:, share > purity].T
    total = mask.sum()
    if total <= 0:
        return local
    class_level = (features * mask).sum(dim=(1, 2)) / total
    return torch.cat([local, class_level[None]])


def fused_logit(query: torch.Tensor, prototypes: torch.Tensor, scale: float = SIMILARITY_SCALE) -> torch.Tensor:
    """sum_k softmax_k(s) s_k with s_k = scale * cos(query cell, prototype k): (h, w)."""
    q = F.normalize(query, dim=0)
    p = F.normalize(prototypes, dim=1)
    similarity = scale * torch.einsum("pc,chw->phw", p, q)
    return (similarity.softmax(dim=0) * similarity).sum(dim=0)


@dataclass(frozen=True)
class Shot:
    """One support example on the feature grid: features (C, h, w) and its foreground share (h, w)."""

    features: torch.Tensor
    foreground: torch.Tensor


def standardise_by_support(supports: list[torch.Tensor], queries: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scale every channel by the support images' mean and standard deviation, so channels of large
    magnitude (classical filters) do not dominate the cosine similarity."""
    pixels = torch.cat([f.reshape(f.shape[0], -1) for f in supports], dim=1)
    mean = pixels.mean(dim=1)[:, None, None]
    std = pixels.std(dim=1).clamp_min(1e-12)[:, None, None]
    return [(f - mean) / std for f in supports], [(f - mean) / std for f in queries]


def to_grid(features: torch.Tensor, mask: torch.Tensor | None, grid: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average-pool full-resolution features (C, H, W) (and a 0/1 mask) to cells of grid x grid pixels."""
    pooled = F.avg_pool2d(features[None], grid, stride=grid, ceil_mode=True)[0] if grid > 1 else features
    if mask is None:
        return pooled, None
    share = F.avg_pool2d(mask[None, None].float(), grid, stride=grid, ceil_mode=True)[0, 0] if grid > 1 else mask.float()
    return pooled, share


def few_shot_logits(query: torch.Tensor, shots: list[Shot], window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """Logits (2, h, w) [background, foreground] of query features (C, h, w) on the feature grid."""
    background, foreground = [], []
    for shot in shots:
        if shot.foreground.max() <= 0:
            raise DinofeatError("a support mask is empty; every support image needs some foreground.")
        background.append(fused_logit(query, class_prototypes(shot.features, 1.0 - shot.foreground, window)))
        foreground.append(fused_logit(query, class_prototypes(shot.features, shot.foreground, window)))
    return torch.stack([torch.stack(background).mean(dim=0), torch.stack(foreground).amax(dim=0)])


def most_confident_component(foreground_probability: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Keep the 8-connected component of `predicted` with the highest sum of foreground probability
    divided by the number of predicted foreground pixels (seed 001's confidence)."""
    components, count = ndimage.label(predicted, structure=np.ones((3, 3), bool))
    if count <= 1:
        return predicted.copy()
    sums = ndimage.sum_labels(foreground_probability, components, index=np.arange(1, count + 1))
    confidence = sums / predicted.sum()
    return components == 1 + int(np.argmax(confidence))


def solidity(region: np.ndarray) -> float:
    """Area of a 2-D boolean region over the area of its convex hull (pixels as unit squares)."""
    boundary = region & ~ndimage.binary_erosion(region)
    ys, xs = np.nonzero(boundary)
    corners = np.concatenate([np.c_[ys + dy, xs + dx] for dy in (0, 1) for dx in (0, 1)])
    return float(region.sum() / ConvexHull(corners).volume)


def one_solid_object(mask: np.ndarray) -> bool:
    """Whether a 2-D support mask shows one solid object: a single 8-connected component (specks under
    `MAJOR_COMPONENT` of it aside) whose solidity is at least `SOLID`."""
    components, count = ndimage.label(mask != 0, structure=np.ones((3, 3), bool))
    if count == 0:
        return False
    sizes = np.bincount(components.ravel())[1:]
    if (sizes >= MAJOR_COMPONENT * sizes.max()).sum() > 1:
        return False
    return solidity(components == 1 + int(np.argmax(sizes))) >= SOLID


def checked_components(components: str) -> str:
    """A components choice ("" means "auto"), or one sentence naming the valid ones."""
    components = components or "auto"
    if components not in COMPONENT_CHOICES:
        raise DinofeatError(f"unknown components choice {components!r}; choose one of {', '.join(COMPONENT_CHOICES)}.")
    return components


def keeps_one_component(masks: list[np.ndarray], components: str = "auto") -> bool:
    """Whether queries keep only their most confident component: forced by `components`, or, for
    "auto", when every labelled 2-D support mask shows one solid object."""
    if checked_components(components) != "auto":
        return components == "most_confident"
    planes = [plane for mask in masks for plane in (mask if mask.ndim == 3 else [mask]) if plane.any()]
    return bool(planes) and all(one_solid_object(plane) for plane in planes)


def segment_query(query: torch.Tensor, shots: list[Shot], size: tuple[int, int], window: int = DEFAULT_WINDOW,
                  one_component: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Foreground probability (H, W) float32 and mask (H, W) bool of one query from grid features;
    with `one_component` only the most confident connected component of the mask is kept."""
    logits = few_shot_logits(query, shots, window)
    logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    probability = logits.softmax(dim=0)[1].numpy()
    predicted = probability > 0.5
    if one_component and predicted.any():
        predicted = most_confident_component(probability, predicted)
    return probability.astype(np.float32), predicted


def volume_support_slices(support_mask: np.ndarray, query_slices: int, parts: int = 3) -> list[int]:
    """For each query slice, the support slice to use: the support's labelled z-range and the query
    are both cut into `parts` equal sections; section i of the query uses the middle slice of section i
    of the support (seed 001's protocol)."""
    labelled = np.flatnonzero(support_mask.reshape(support_mask.shape[0], -1).any(axis=1))
    if len(labelled) == 0:
        raise DinofeatError("the support mask is empty; label the object in some support slices.")
    top, bottom = int(labelled[0]), int(labelled[-1]) + 1
    edges = np.linspace(top, bottom, parts + 1)
    middles = [int((edges[i] + edges[i + 1]) // 2) for i in range(parts)]
    sections = np.minimum((np.arange(query_slices) * parts) // max(query_slices, 1), parts - 1)
    return [middles[s] for s in sections]
