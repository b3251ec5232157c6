"""The feature sets a dinofeat server offers, known to the client without asking one (and without torch).

`dinofeat sets` prints this list when no --server is given, so listing the sets starts no server and
loads no torch; with --server it asks that server instead. The server's registry
(`dinofeat_server.engine.stacks.FEATURE_SETS`) must offer the same sets, in the same order, with the
same descriptions, kinds and channel counts: tests/test_startup.py checks that the two agree. A new
set is one line there and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SetInfo:
    """One feature set as `dinofeat sets` lists it.

    Parameters
    ----------
    name : str
        What `--set` takes.
    channels : int
        Channels of a greyscale image with the default options (default backbone, no PCA), as the
        server's `channels_per_image_channel`.
    deep : bool
        Whether the set runs a DINOv2 backbone (weights, tiles, a fitted PCA) or only filters.
    description : str
        One line for people.
    """

    name: str
    channels: int
    deep: bool
    description: str


SETS: tuple[SetInfo, ...] = (
    SetInfo("multiscale", 53, False, "the default bank: Gaussian, gradient magnitude, Hessian and structure-tensor eigenvalues at "
                                     "sigma 0.5-16, differences of Gaussians"),
    SetInfo("classical", 58, False, "Trainable-Weka-like filter bank: raw, Sobel, Hessian, Gaussian, DoG, membrane projections"),
    SetInfo("ilastik", 49, False, "ilastik's Pixel Classification features, all 37 (Gaussian, LoG, gradient magnitude, DoG, "
                                  "structure tensor and Hessian eigenvalues at sigma 0.3-10), computed as ilastik does"),
    SetInfo("dinov2", 384, True, "DINOv2 patch features at full resolution (optionally PCA-reduced)"),
    SetInfo("attention", 6, True, "DINOv2 last-block CLS attention, one channel per head"),
    SetInfo("hybrid", 90, True, "DINOv2 PCA-32 + classical bank, each channel in the dataset's robust range"),
)
"""Every set, in the server's order (FEATURE_SETS)."""
