"""dinofeat in napari: paint scribbles, segment with a dinofeat server's features, live while painting.

The dock widget is `widget.DinofeatWidget` (napari loads it through the npe2 manifest `napari.yaml`); the work it
does is `jobs` (Qt-free functions over a `FeatureClient`, for scripts). The widget's process never imports torch:
features come from a server (this user's local server, started on first use, or HOST:PORT).
Install: `pip install dinofeat[napari]`.
"""

__all__ = ["jobs"]
