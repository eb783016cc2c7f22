"""/v1/memory-banks/{key}: a run's memory bank, counted per class, and cleared when it ends."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from actgen_generator.api.deps import AUTHED, BankKey, PrincipalDep, QueueDep, ServiceDep
from actgen_generator.api.errors import ERROR_RESPONSES, ApiError
from actgen_generator.events import log_event
from actgen_shared.schemas import MemoryBankInfo

router = APIRouter(
    prefix="/v1/memory-banks", tags=["memory banks"], dependencies=AUTHED, responses=ERROR_RESPONSES
)


async def _known(queue: QueueDep, key: str, tenant: str) -> None:
    """404 unless a job of this tenant named the bank (within its TTL)."""
    if not await queue.bank_known(key, tenant):
        raise ApiError(404, f"key: no memory bank {key} (no job named it, or it expired)")


@router.get("/{key}", response_model=MemoryBankInfo)
async def get_bank(key: BankKey, queue: QueueDep, principal: PrincipalDep) -> MemoryBankInfo:
    """Latents per class (found through the bank's index); another tenant's bank is a 404."""
    await _known(queue, key, principal.tenant)
    return MemoryBankInfo(key=key, counts=await queue.bank_counts(key, principal.tenant))


@router.delete("/{key}", status_code=204, response_class=Response)
async def clear_bank(key: BankKey, queue: QueueDep, svc: ServiceDep, principal: PrincipalDep) -> Response:
    await _known(queue, key, principal.tenant)
    deleted = await queue.clear_bank(key, principal.tenant)
    log_event("bank.cleared", None, replica=svc.replica_id, key=key, tenant=principal.tenant, latents=deleted)
    return Response(status_code=204)
