"""GET /v1/runs/{run_id}/results: a run's finished items after a cursor, long-polling."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from actgen_generator.api.deps import AUTHED, PrincipalDep, QueueDep, RunId, ServiceDep
from actgen_generator.api.errors import ERROR_RESPONSES, ApiError
from actgen_generator.api.lifecycle import MAX_WAIT_S
from actgen_shared import codecs
from actgen_shared.queue import validate_cursor
from actgen_shared.schemas import START_CURSOR, ResultItem, ResultsPage

MAX_RESULTS_LIMIT = 1000
MAX_STREAM_PART = 2**64 - 1
BUSY_RETRY_AFTER_S = 1  # Retry-After of a long-poll refused for want of a free slot

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
    principal: PrincipalDep,
    after: Annotated[str, Query(max_length=41, description="cursor: the last `next` you got")] = START_CURSOR,
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_LIMIT)] = 100,
    wait: Annotated[float, Query(ge=0.0, le=MAX_WAIT_S, description="long-poll seconds")] = 0.0,
) -> ResultsPage:
    """Finished items of a run after the cursor, oldest first; waits up to ``wait`` seconds
    (at most the replica's ACTGEN_MAX_WAIT_S) for the first one. Keep ``next`` (e.g. in a
    checkpoint) to resume without repeats.

    Another tenant's run is a 404 (a run nobody has submitted to yet is an empty page). At most ACTGEN_MAX_LONG_POLLS requests
    wait at once on a replica, on Redis connections of their own; past that a request is
    answered at once: with what is there, or 429 with Retry-After when nothing is."""
    wait = min(wait, svc.settings.max_wait_s)  # the page may come back empty: ask again
    after = _check_cursor(after)
    if await queue.run_of_another(run_id, principal.tenant):
        raise ApiError(404, f"run_id: no run {run_id} of this key's tenant")
    poll_redis = svc.poll_redis
    if wait > 0 and poll_redis is not None and svc.long_polls < svc.settings.max_long_polls:
        svc.long_polls += 1  # one event loop: no lock needed between the check and this
        try:
            entries, next_cursor = await queue.read_results(
                run_id, after, limit, wait, tenant=principal.tenant, redis=poll_redis
            )
        finally:
            svc.long_polls -= 1
    else:
        entries, next_cursor = await queue.read_results(run_id, after, limit, 0.0, tenant=principal.tenant)
        if wait > 0 and not entries:
            raise ApiError(
                429,
                f"wait: {svc.settings.max_long_polls} long-polls are waiting on this replica already "
                f"(ACTGEN_MAX_LONG_POLLS) and run {run_id} has nothing after {after}; ask again",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
            )
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
