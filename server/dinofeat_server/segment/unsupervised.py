"""Segmentation and pictures without labels: k-means clusters, a 3-component PCA picture and an
attention-based foreground mask (seed 000's unsupervised uses)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans

from ..engine.postprocess import principal_axes_of

SAMPLE_PIXELS = 100_000
"""k-means, the PCA picture and the foreground threshold are fitted on at most this many pixels."""

Labeller = Callable[[np.ndarray], np.ndarray]
"""Features (C, rows, X) -> result (K, rows, X) of an analysis fitted on a sample."""


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def kmeans_labeller(sample: np.ndarray, k: int, seed: int = 0) -> Labeller:
    """k-means on the L2-normalised (N, C) sample; the labeller gives uint16 labels 1..k (1, rows, X)."""
    model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(unit_rows(sample))

    def label(block: np.ndarray) -> np.ndarray:
        flat = unit_rows(block.reshape(block.shape[0], -1).T)
        labels = np.concatenate([model.predict(flat[i : i + SAMPLE_PIXELS]) for i in range(0, len(flat), SAMPLE_PIXELS)])
        return (labels + 1).astype(np.uint16).reshape(1, *block.shape[1:])

    return label


def pca_labeller(sample: np.ndarray) -> Labeller:
    """The first three principal components of the (N, C) sample, each stretched between its 1st and
    99th percentiles to uint8 (3, rows, X) (signs fixed, so the same data always gives the same colours)."""
    basis = principal_axes_of(torch.from_numpy(sample).double(), 3)
    mean, components = basis.mean.numpy(), basis.components.numpy()
    projected = (sample - mean) @ components.T
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)

    def picture(block: np.ndarray) -> np.ndarray:
        flat = block.reshape(block.shape[0], -1).T
        scaled = np.clip(((flat - mean) @ components.T - low) / np.maximum(high - low, 1e-12), 0, 1)
        if scaled.shape[1] < 3:
            scaled = np.concatenate([scaled, np.zeros((len(scaled), 3 - scaled.shape[1]))], axis=1)
        return (scaled * 255).round().astype(np.uint8).T.reshape(3, *block.shape[1:])

    return picture


def foreground_labeller(sample: np.ndarray) -> Labeller:
    """Foreground (uint8 0/1, (1, rows, X)): the heads' mean attention above the sample's Otsu threshold."""
    threshold = otsu_threshold(sample.mean(axis=1))
    return lambda block: (block.mean(axis=0, keepdims=True) > threshold).astype(np.uint8)


def analysis_labeller(analysis: str, sample: np.ndarray, clusters: int = 2, seed: int = 0) -> Labeller:
    """The labeller of "kmeans", "pca" or "foreground" fitted on an (N, C) sample of the features."""
    if analysis == "kmeans":
        return kmeans_labeller(sample, clusters, seed)
    if analysis == "pca":
        return pca_labeller(sample)
    return foreground_labeller(sample)


def strided_pixels(features: np.ndarray, step: int) -> np.ndarray:
    """(N, C) feature vectors of every `step`-th pixel of a (C, ...) array, in row-major order."""
    return features.reshape(features.shape[0], -1)[:, ::step].T


def whole_sample(features: torch.Tensor) -> np.ndarray:
    """(N, C) evenly spaced sample of a (C, H, W) stack's pixels."""
    pixels = features[0].numel()
    return strided_pixels(features.numpy(), max(1, pixels // SAMPLE_PIXELS))


def kmeans_labels(features: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """Cluster labels 1..k (uint16, (H, W)) of per-pixel L2-normalised features (C, H, W)."""
    return kmeans_labeller(whole_sample(features), k, seed)(features.numpy())[0]


def pca_picture(features: torch.Tensor) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a (C, H, W) stack's first three principal components (see pca_labeller)."""
    return np.moveaxis(pca_labeller(whole_sample(features))(features.numpy()), 0, -1)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold maximising the between-class variance of a histogram of `values`."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    total_weight, total_mean = weight[-1], mean[-1]
    background, foreground = weight[:-1], total_weight - weight[:-1]
    valid = (background > 0) & (foreground > 0)
    between = np.zeros(len(background))
    mb = mean[:-1][valid] / background[valid]
    mf = (total_mean - mean[:-1][valid]) / foreground[valid]
    between[valid] = background[valid] * foreground[valid] * (mb - mf) ** 2
    return float(edges[1:-1][np.argmax(between)])


def attention_foreground(attention: torch.Tensor) -> np.ndarray:
    """Foreground mask (H, W) bool: the heads' mean CLS attention above its Otsu threshold."""
    return foreground_labeller(whole_sample(attention))(attention.numpy())[0].astype(bool)
