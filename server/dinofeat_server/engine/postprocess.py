"""Feature post-processing: PCA to k channels, per-channel min-max or z-score, per-pixel L2.

All functions take and return (C, H, W) float32 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PCA_SAMPLE_PIXELS = 200_000
"""PCA is fitted on at most this many pixels (evenly spaced), then applied to all."""


@dataclass(frozen=True)
class PcaBasis:
    """Mean (C,) and components (k, C), sorted by decreasing variance, each with its sign fixed."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        c, h, w = features.shape
        flat = features.reshape(c, -1) - self.mean[:, None]
        return (self.components @ flat).reshape(-1, h, w)


def fit_pca(features: torch.Tensor, components: int) -> PcaBasis:
    """Principal components of the pixels' feature vectors (C, H, W), from at most PCA_SAMPLE_PIXELS
    evenly spaced pixels; see `principal_axes`."""
    c = features.shape[0]
    flat = features.reshape(c, -1)
    step = max(1, flat.shape[1] // PCA_SAMPLE_PIXELS)
    return principal_axes_of(flat[:, ::step].T, components)


def principal_axes_of(samples: torch.Tensor, components: int) -> PcaBasis:
    """PCA of (N, C) samples: the sign makes each component's largest loading positive, so the same
    data always gives the same basis and picture. The covariance is accumulated in float64 over
    blocks of rows, so no float64 copy of the samples is made."""
    mean = samples.sum(dim=0, dtype=torch.float64) / max(len(samples), 1)
    covariance = torch.zeros(samples.shape[1], samples.shape[1], dtype=torch.float64)
    for start in range(0, len(samples), PCA_BLOCK_ROWS):
        centred = samples[start : start + PCA_BLOCK_ROWS].double() - mean
        covariance += centred.T @ centred
    covariance /= max(len(samples) - 1, 1)
    variance, vectors = torch.linalg.eigh(covariance)
    order = torch.argsort(variance, descending=True)[:components]
    vectors = vectors[:, order].T
    signs = torch.sign(vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True)))
    vectors = vectors * signs
    return PcaBasis(mean.float(), vectors.float(), variance[order].float())


PCA_BLOCK_ROWS = 8192


def principal_axes(samples: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (C,), components (k, C)) float32 of (N, C) samples, as `principal_axes_of`."""
    basis = principal_axes_of(torch.from_numpy(np.ascontiguousarray(samples)), components)
    return basis.mean.numpy(), basis.components.numpy()


def l2_per_pixel(features: torch.Tensor) -> torch.Tensor:
    """Each pixel's feature vector to unit length."""
    return features / features.norm(dim=0, keepdim=True).clamp_min(1e-12)

