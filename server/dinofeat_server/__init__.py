"""dinofeat feature server: the engine (torch), segmentation (scikit-learn) and the gRPC service."""

import os

# Before torch loads libgomp, which reads this once: its threads sleep at the end of each parallel region
# instead of spinning. Spinning threads take the cores the remaining work needs whenever the machine has
# other work: on a busy 2-core CPU the default bank took 2-5 s at 2 threads instead of 0.2 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dinofeat import __version__

__all__ = ["__version__"]
