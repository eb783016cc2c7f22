"""``python tests/slow_encode_replica.py serve ...``: a replica whose encode stage is slow.

For tests/test_overlap_encode.py: before encoding a sampled batch (``worker.encode_batch``, run
while the next batch samples) it touches a file in ``SLOW_ENCODE_DIR`` (named ``{ns}-{item
indices}``) and waits ``SLOW_ENCODE_S``, so a test can stop the replica while an encode is in
flight. Everything else is the real replica (``actgen-generator serve``: uvicorn, worker, Redis).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from actgen_generator import worker
from actgen_generator.cli import main

_real_encode = worker.encode_batch


def _slow_encode(batch: Any, outputs: Any) -> Any:
    indices = "-".join(str(index) for _, index in batch)
    Path(os.environ["SLOW_ENCODE_DIR"], f"{time.monotonic_ns()}-{indices}").touch()
    time.sleep(float(os.environ["SLOW_ENCODE_S"]))
    return _real_encode(batch, outputs)


worker.encode_batch = _slow_encode

if __name__ == "__main__":
    raise SystemExit(main())
