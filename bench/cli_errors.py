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
# Errors of modules that need torch, looked up only where the script loaded them: importing them here would load
# torch (about 0.5 GiB resident) into every script, the speed bench's memory probes included.
TORCH_ERRORS = (("model.checkpoint", "CheckpointError"), ("model.teachers", "TeacherError"))


def input_errors() -> tuple[type[BaseException], ...]:
    """The bad-input error types, with those of the torch modules this process has loaded."""
    loaded = (getattr(sys.modules[m], name, None) for m, name in TORCH_ERRORS if m in sys.modules)
    return INPUT_ERRORS + tuple(e for e in loaded if e is not None)


def run_main(main: Callable[[], int | None]) -> int:
    """``main()``'s exit status; 2 with ``error: ...`` on stderr for bad input."""
    try:
        return main() or 0
    except Exception as e:
        if not isinstance(e, input_errors()):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
