"""Every Redis key the project uses, named once (docs/architecture.md section 4).

All keys live under a configurable prefix (default ``actgen:``), so several deployments or
test runs can share one Redis server without seeing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

CONSUMER_GROUP = "generators"


@dataclass(frozen=True)
class Keys:
    """Builds the project's Redis key names under one prefix."""

    prefix: str = "actgen:"

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
        return f"{self.prefix}idem:{key}"

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
        return f"{self.prefix}run:{run_id}:results"

    # --- memory banks and classifiers ------------------------------------------------------
    def bank(self, bank_key: str, class_id: int) -> str:
        """List of float16 latents (safetensors bytes), newest first, capped (LTRIM)."""
        return f"{self.prefix}bank:{bank_key}:{class_id}"

    def bank_pattern(self, bank_key: str) -> str:
        return f"{self.prefix}bank:{bank_key}:*"

    def bank_class_id(self, bank_key: str, key: str) -> int | None:
        """The class id of a key matched by ``bank_pattern``, or None when it is not one."""
        head = self.bank(bank_key, 0)[:-1]
        tail = key[len(head) :] if key.startswith(head) else ""
        return int(tail) if tail.isdigit() else None

    def classifier(self, sha256_hex: str) -> str:
        """Safetensors bytes of an uploaded classifier."""
        return f"{self.prefix}clf:{sha256_hex}"

    def classifier_meta(self, sha256_hex: str) -> str:
        """JSON metadata of an uploaded classifier."""
        return f"{self.prefix}clf:{sha256_hex}:meta"

    def classifier_jobs(self, sha256_hex: str) -> str:
        """Set of the ids of jobs submitted with this classifier (a delete refuses while one of
        them is queued or running)."""
        return f"{self.prefix}clf:{sha256_hex}:jobs"
