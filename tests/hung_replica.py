"""``python tests/hung_replica.py serve ...``: a replica whose sampler hangs inside its step loop.

For tests/test_watchdog.py: the echo sampler's step ``HANG_AT_STEP`` of every batch never returns
(a thread blocked for good, as one stuck in a CUDA kernel is), and nothing is raised. Everything
else is the real replica (``actgen-generator serve``: uvicorn, the worker, Redis).
"""

from __future__ import annotations

import threading
from typing import Any

from actgen_generator import echo
from actgen_generator.cli import main

HANG_AT_STEP = 2
_real_call = echo.EchoSampler.__call__


def _hanging_call(
    self: echo.EchoSampler, items: Any, options: Any, classifier: Any = None, on_step: Any = None
) -> Any:
    def step(i: int, total: int) -> bool:
        if i == HANG_AT_STEP:
            threading.Event().wait()  # never set: this step never returns
        return on_step(i, total) if on_step is not None else True

    return _real_call(self, items, options, classifier, step)


echo.EchoSampler.__call__ = _hanging_call  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
