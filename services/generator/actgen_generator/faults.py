"""GPU faults a replica cannot recover from, and a batch that never ends (docs/architecture.md, "Faults").

* :func:`device_error`: what ends the replica (its jobs go back to the queue without using up a
  delivery): batch.py's lost-device markers, plus cuDNN's and cuBLAS's execution and internal
  errors (a kernel that failed on the device, not an input the job got wrong).
* :func:`synchronize`: wait for the device's queued work before a batch's results are stored, so
  an asynchronous CUDA error is raised by the batch that caused it, not by the next one.
* :func:`watchdog_limit` and :func:`run_in_daemon_thread`: a batch runs in a daemon thread of its
  own and the worker waits at most a limit derived from its steps; a hung kernel (or any step
  that never returns) raises nothing, so the limit is what notices it. The hung thread cannot be
  stopped: the replica leaves ready, hands its jobs back and its process exits (a daemon thread
  does not hold the exit up, as a thread of asyncio's default executor would).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from actgen_generator.batch import device_lost

T = TypeVar("T")

# Raised by a kernel that failed on the device; the context is suspect afterwards.
DEVICE_FAULT_MARKERS = (
    "CUDNN_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUBLAS_STATUS_INTERNAL_ERROR",
)


class BatchHung(RuntimeError):
    """A batch ran past its watchdog limit: a step never returned."""


def device_error(exc: BaseException) -> bool:
    """The device failed (not the job): lost device, or a cuDNN/cuBLAS execution or internal error."""
    return device_lost(exc) or any(marker in str(exc) for marker in DEVICE_FAULT_MARKERS)


def synchronize() -> None:
    """Wait for the CUDA work queued so far (nothing without CUDA in use): an asynchronous error
    surfaces here, in the thread of the batch that caused it."""
    torch = sys.modules.get("torch")  # an API-only or echo replica may never touch CUDA
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def watchdog_limit(steps: int, step_s: float, grace_s: float) -> float | None:
    """Seconds a batch of ``steps`` denoising steps may take: ``grace_s + steps * step_s``; None
    (no limit) when ``step_s`` is 0."""
    if step_s <= 0:
        return None
    return grace_s + max(1, steps) * step_s


async def run_in_daemon_thread(fn: Callable[[], T], limit_s: float | None, name: str) -> T:
    """``fn()`` in a daemon thread; its result, or BatchHung once ``limit_s`` has passed (the
    thread is left running: nothing can stop a thread stuck in a kernel)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # given up on already
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)  # type: ignore[arg-type]

    def target() -> None:
        try:
            outcome = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the awaiting coroutine)
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, None, exc)
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, outcome, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=limit_s)
    except TimeoutError:
        future.cancel()  # what the thread hands back later is dropped
        raise BatchHung(f"the batch ran past its watchdog limit of {limit_s:g} s") from None


__all__ = [
    "DEVICE_FAULT_MARKERS",
    "BatchHung",
    "device_error",
    "run_in_daemon_thread",
    "synchronize",
    "watchdog_limit",
]
