"""Segmentation and pictures without labels: k-means clusters, a 3-component PCA picture and an
attention-based foreground mask (seed 000's unsupervised uses)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from ..engine.postprocess import fit_pca, l2_per_pixel

SAMPLE_PIXELS = 100_000
"""k-means is fitted on at most this many pixels (evenly spaced), then every pixel is assigned."""


def kmeans_labels(features: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """Cluster labels 1..k (uint16, (H, W)) of per-pixel L2-normalised features (C, H, W)."""
    c, h, w = features.shape
    flat = l2_per_pixel(features).reshape(c, -1).T.numpy()
    sample = flat[:: max(1, len(flat) // SAMPLE_PIXELS)]
    model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(sample)
    labels = np.concatenate([model.predict(flat[i : i + SAMPLE_PIXELS]) for i in range(0, len(flat), SAMPLE_PIXELS)])
    return (labels + 1).astype(np.uint16).reshape(h, w)


def pca_picture(features: torch.Tensor) -> np.ndarray:
    """RGB uint8 (H, W, 3): the first three principal components, each stretched between its 1st and
    99th percentiles (signs fixed, so the same image always gives the same colours)."""
    components = fit_pca(features, 3).apply(features).numpy()
    if components.shape[0] < 3:
        components = np.concatenate([components, np.zeros((3 - components.shape[0], *components.shape[1:]), np.float32)])
    low = np.percentile(components, 1, axis=(1, 2), keepdims=True)
    high = np.percentile(components, 99, axis=(1, 2), keepdims=True)
    scaled = np.clip((components - low) / np.maximum(high - low, 1e-12), 0, 1)
    return np.moveaxis((scaled * 255).round().astype(np.uint8), 0, -1)


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
    mean = attention.mean(dim=0).numpy()
    return mean > otsu_threshold(mean)
