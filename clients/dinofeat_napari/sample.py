"""napari sample data: the demo's generated three-phase micrograph with its scribbles (no download)."""

from __future__ import annotations

from dinofeat_client.sample import three_phase_sample


def three_phase() -> list[tuple]:
    """The sample image and its scribbles as napari layer data, the scribbles linked to the image for the widget."""
    sample = three_phase_sample()
    return [(sample.image, {"name": "sample"}, "image"),
            (sample.scribbles, {"name": "sample scribbles", "metadata": {"dinofeat_image": "sample", "dinofeat_role": "scribbles"}},
             "labels")]
