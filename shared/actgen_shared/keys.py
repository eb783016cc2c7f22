"""Every Redis key the project uses, named once (docs/architecture.md section 4).

All keys live under a configurable prefix (default ``actgen:``), so several deployments or
test runs can share one Redis server without seeing each other.

Tenants (docs/architecture.md, "Tenants"): every name a client chooses (run id, memory bank,
idempotency key, classifier) is scoped by its tenant (``{tenant}/{name}``), and a job id carries
its tenant (``{tenant}.{hex}``), so two tenants never share a key. The ``default`` tenant (the
single ``ACTGEN_API_KEY``, or no key) keeps the unscoped names of earlier versions.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, replace

CONSUMER_GROUP = "generators"
DEFAULT_TENANT = "default"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"  # no '.' (job ids) and no '/' (scoped names)
_TENANT = re.compile(TENANT_PATTERN)
JOB_TENANT_SEPARATOR = "."


def check_tenant(tenant: str) -> str:
    """A tenant name as keys use it; ValueError otherwise."""
    if not _TENANT.match(tenant):
        raise ValueError(f"tenant {tenant!r} must match {TENANT_PATTERN}")
    return tenant


def new_job_id(tenant: str = DEFAULT_TENANT) -> str:
    """A fresh job id of ``tenant``: 128 random bits, after ``{tenant}.`` unless the default tenant."""
    hex_ = uuid.uuid4().hex
    return hex_ if tenant == DEFAULT_TENANT else f"{tenant}{JOB_TENANT_SEPARATOR}{hex_}"


def tenant_of_job(job_id: str) -> str:
    """The tenant a job id belongs to (what comes before its ``.``; none: the default tenant)."""
    head, sep, _ = job_id.partition(JOB_TENANT_SEPARATOR)
    return head if sep else DEFAULT_TENANT


@dataclass(frozen=True)
class Keys:
    """Builds the project's Redis key names under one prefix."""

    prefix: str = "actgen:"
    tenant: str = DEFAULT_TENANT  # scopes the names a client chooses (runs, banks, classifiers)

    def for_tenant(self, tenant: str) -> Keys:
        """The same keys, with names scoped by ``tenant``."""
        return self if tenant == self.tenant else replace(self, tenant=check_tenant(tenant))

    def for_job(self, job_id: str) -> Keys:
        """The keys of the tenant that owns ``job_id``."""
        return self.for_tenant(tenant_of_job(job_id))

    def scoped(self, name: str) -> str:
        """A client-chosen name inside this tenant (unchanged for the default tenant)."""
        return name if self.tenant == DEFAULT_TENANT else f"{self.tenant}/{name}"

    # --- job queue -------------------------------------------------------------------------
    @property
    def jobs_stream(self) -> str:
        """Stream of job ids; the job hash is the source of truth."""
        return f"{self.prefix}jobs"

    @property
    def dead_letter_stream(self) -> str:
        """Jobs that exhausted their deliveries, with the reason."""
        return f"{self.prefix}jobs:dead"

    def job(self, job_id: str) -> str:
        """Hash: status, progress, error, timestamps, replica, the request itself."""
        return f"{self.prefix}job:{job_id}"

    def job_image(self, job_id: str, index: int) -> str:
        return f"{self.prefix}job:{job_id}:img:{index}"

    def job_latent(self, job_id: str, index: int) -> str:
        """float16 safetensors bytes of one item's final latent."""
        return f"{self.prefix}job:{job_id}:lat:{index}"

    def job_done_items(self, job_id: str) -> str:
        """Hash item index -> results-stream id: the dedupe that makes stored results exactly-once."""
        return f"{self.prefix}job:{job_id}:done"

    def job_progress(self, job_id: str) -> str:
        """Capped stream of progress events, so a reconnecting client resumes from its id."""
        return f"{self.prefix}job:{job_id}:progress"

    def idempotency(self, key: str) -> str:
        """String ``{job id} {sha256 of the body}``: a resubmit finds its job, a changed body is refused."""
        return f"{self.prefix}idem:{self.scoped(key)}"

    @property
    def usage(self) -> str:
        """Hash ``jobs`` / ``bytes``: this tenant's queued and running jobs and their request bytes."""
        return f"{self.prefix}usage:{self.tenant}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}cancel:{job_id}"

    def heartbeat(self, consumer: str) -> str:
        return f"{self.prefix}hb:{consumer}"

    @property
    def jobs_by_status(self) -> str:
        """Hash status -> count, for /metrics without scanning."""
        return f"{self.prefix}stats:jobs_by_status"

    # --- results ---------------------------------------------------------------------------
    def run_results(self, run_id: str) -> str:
        """Stream with one entry per finished item of a run; the trainer's cursor is an id in it."""
        return f"{self.prefix}run:{self.scoped(run_id)}:results"

    def run(self, run_id: str) -> str:
        """A run this tenant submitted to (set at each submit, expires with its results)."""
        return f"{self.prefix}run:{self.scoped(run_id)}"

    def run_tenants(self, run_id: str) -> str:
        """Set of the tenants that submitted to a run id (not scoped: it is how another tenant's
        run is told from one nobody has used, a 404 against an empty page)."""
        return f"{self.prefix}runtenants:{run_id}"

    # --- memory banks and classifiers ------------------------------------------------------
    def bank(self, bank_key: str, class_id: int) -> str:
        """List of float16 latents (safetensors bytes), newest first, capped (LTRIM)."""
        return f"{self.prefix}bank:{self.scoped(bank_key)}:{class_id}"

    def bank_index(self, bank_key: str) -> str:
        """Hash class id -> 1 for each class the bank holds, plus ``_`` from the first submit that
        names it: GET and DELETE find a bank's lists here, never by a keyspace scan."""
        return f"{self.prefix}bankidx:{self.scoped(bank_key)}"

    def classifier(self, sha256_hex: str) -> str:
        """Safetensors bytes of an uploaded classifier."""
        return f"{self.prefix}clf:{self.scoped(sha256_hex)}"

    def classifier_meta(self, sha256_hex: str) -> str:
        """JSON metadata of an uploaded classifier."""
        return f"{self.prefix}clf:{self.scoped(sha256_hex)}:meta"

    def classifier_jobs(self, sha256_hex: str) -> str:
        """Set of the ids of jobs submitted with this classifier (a delete refuses while one of
        them is queued or running)."""
        return f"{self.prefix}clf:{self.scoped(sha256_hex)}:jobs"
