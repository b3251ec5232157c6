"""Threads of a worker. A worker is one compute slot on one device of the server's pool (device_pool.py):
it computes one request, or one tile lent to another request, at a time with T threads
(`ServerLimits.threads_per_worker`; by default the cores shared out, so that workers x devices x T <=
the cores this process may use).

T bounds every thread pool a request can start:
- torch's intra-op threads (and MKL's): `torch.set_num_threads`;
- the BLAS (OpenBLAS of numpy and scipy) and OpenMP (scikit-learn's, torch's libgomp) pools:
  threadpoolctl, which scikit-learn always brings;
- the forest's jobs: passed by each job to `segment.classifiers` (`threads`).

torch's and OpenMP's settings belong to the thread that makes them (BLAS's are process-wide), so every
engine thread applies them when it starts (`use_threads` is the worker pool's initializer), and the
server applies them once for itself, which also sets the default of any thread started later. The
pool's threads for lent tiles apply them too.
"""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits


def use_threads(threads: int) -> None:
    """Compute with at most `threads` threads from this thread on: torch, BLAS and OpenMP."""
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
