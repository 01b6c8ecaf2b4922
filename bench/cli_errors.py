"""The bench scripts' bad input (no such bundle, data, checkpoint or teacher): one line on stderr and exit 2, as the
package's commands do, instead of a traceback. Errors of the code itself still show theirs."""
from __future__ import annotations

import sys
from typing import Callable

from devices.baseline import BaselineError
from runtime.backends import BackendError
from runtime.data import DataError
from runtime.errors import BundleError
from runtime.preprocess import ImageError

INPUT_ERRORS: tuple[type[BaseException], ...] = (BundleError, DataError, ImageError, FileNotFoundError, BackendError,
                                                 BaselineError)
try:  # checkpoints and teachers need torch, which a runtime-only install lacks
    from model.checkpoint import CheckpointError
    from model.teachers import TeacherError

    INPUT_ERRORS += (CheckpointError, TeacherError)
except ImportError:
    pass


def run_main(main: Callable[[], int | None]) -> int:
    """``main()``'s exit status; 2 with ``error: ...`` on stderr for bad input."""
    try:
        return main() or 0
    except INPUT_ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
