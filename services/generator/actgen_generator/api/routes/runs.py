"""GET /v1/runs/{run_id}/results: a run's finished items after a cursor, long-polling."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from actgen_generator.api.deps import AUTHED, QueueDep, RunId, ServiceDep
from actgen_generator.api.errors import ERROR_RESPONSES, ApiError
from actgen_generator.api.lifecycle import MAX_WAIT_S
from actgen_shared import codecs
from actgen_shared.queue import validate_cursor
from actgen_shared.schemas import START_CURSOR, ResultItem, ResultsPage

MAX_RESULTS_LIMIT = 1000
MAX_STREAM_PART = 2**64 - 1

router = APIRouter(prefix="/v1/runs", tags=["results"], dependencies=AUTHED, responses=ERROR_RESPONSES)


def _check_cursor(after: str) -> str:
    try:
        validate_cursor(after)
        if any(int(part) > MAX_STREAM_PART for part in after.split("-")):
            raise ValueError(f"cursor {after!r} is out of range for a stream id")
    except ValueError as exc:
        raise ApiError(422, f"after: {exc}") from None
    return after


@router.get("/{run_id}/results", response_model=ResultsPage)
async def run_results(
    run_id: RunId,
    queue: QueueDep,
    svc: ServiceDep,
    after: Annotated[str, Query(max_length=41, description="cursor: the last `next` you got")] = START_CURSOR,
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_LIMIT)] = 100,
    wait: Annotated[float, Query(ge=0.0, le=MAX_WAIT_S, description="long-poll seconds")] = 0.0,
) -> ResultsPage:
    """Finished items of a run after the cursor, oldest first; waits up to ``wait`` seconds
    (at most the replica's ACTGEN_MAX_WAIT_S) for the first one. Keep ``next`` (e.g. in a
    checkpoint) to resume without repeats."""
    wait = min(wait, svc.settings.max_wait_s)  # the page may come back empty: ask again
    entries, next_cursor = await queue.read_results(run_id, _check_cursor(after), limit, wait)
    images = await queue.get_many([e.get("image_key", "") for e in entries])
    items: list[ResultItem] = []
    size = 0
    for e, image in zip(entries, images, strict=True):
        if image is not None:  # expired blobs are skipped; the cursor still moves past them
            size += len(image)
            if items and size > svc.settings.max_results_bytes:  # page full: the rest come next
                next_cursor = items[-1].id
                break
            items.append(
                ResultItem(
                    id=e["id"],
                    job_id=e["job_id"],
                    index=int(e["index"]),
                    epoch=int(e.get("epoch") or 0),
                    class_id=int(e["class_id"]),
                    guide_id=e.get("guide_id") or None,
                    image=codecs.b64encode(image),
                    latent_key=e.get("latent_key") or None,
                )
            )
        next_cursor = e["id"]
    return ResultsPage(items=items, next=next_cursor)
