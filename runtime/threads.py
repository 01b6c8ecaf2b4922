"""One thread pool owns the cores: the host work between levels (head matmul, softmax, KV row gathering) runs on
one thread, so numpy's BLAS pool (OpenBLAS, MKL, BLIS) never wakes up and spins against the backend's threads.

The limit is scoped (threadpoolctl): it holds while a cascade runs and restores the caller's BLAS settings after.
No environment variable is needed.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

from threadpoolctl import ThreadpoolController

_controller: ThreadpoolController | None = None


def controller() -> ThreadpoolController:
    """The process's threadpoolctl controller (made once: looking the libraries up costs a few ms)."""
    global _controller
    if _controller is None:
        import numpy  # noqa: F401  (numpy's BLAS must be loaded to be found)

        _controller = ThreadpoolController()
    return _controller


def host_single_threaded() -> AbstractContextManager:
    """Context manager: BLAS pools limited to 1 thread while open (OpenMP is left to its owner, e.g. a backend)."""
    return controller().limit(limits=1, user_api="blas")


def blas_threads() -> list[int]:
    """Threads of each BLAS library loaded in this process, as threadpoolctl sees them now (for tests)."""
    return [info["num_threads"] for info in controller().select(user_api="blas").info()]
