"""/v1/memory-banks/{key}: a run's memory bank, counted per class, and cleared when it ends."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from actgen_generator.api.deps import AUTHED, BankKey, QueueDep, ServiceDep
from actgen_generator.api.errors import ERROR_RESPONSES
from actgen_generator.events import log_event
from actgen_shared.schemas import MemoryBankInfo

router = APIRouter(
    prefix="/v1/memory-banks", tags=["memory banks"], dependencies=AUTHED, responses=ERROR_RESPONSES
)


@router.get("/{key}", response_model=MemoryBankInfo)
async def get_bank(key: BankKey, queue: QueueDep) -> MemoryBankInfo:
    return MemoryBankInfo(key=key, counts=await queue.bank_counts(key))


@router.delete("/{key}", status_code=204, response_class=Response)
async def clear_bank(key: BankKey, queue: QueueDep, svc: ServiceDep) -> Response:
    deleted = await queue.clear_bank(key)
    log_event("bank.cleared", None, replica=svc.replica_id, key=key, latents=deleted)
    return Response(status_code=204)
