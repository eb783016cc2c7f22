"""`make chaos`: a generator pool under faults, then an audit that nothing was lost, doubled or stuck.

Three replicas (``actgen-generator serve --sampler echo``, each step sleeping
ACTGEN_ECHO_STEP_S so faults land mid-job) share one redis-server with AOF (appendfsync
everysec). A client posts jobs like a trainer (several runs, an idempotency key per job, retried
against another replica while one is down), while a fault loop, for a fixed time, picks at
random: SIGKILL a replica, SIGTERM a replica (both restarted, under a fresh default replica id),
restart Redis (SIGTERM, the same AOF directory and port), or pause a replica (SIGSTOP past its
lease, then SIGCONT). Then every replica is brought back and the queue drains.

The audit, from Redis itself: every accepted job is final (done, or failed with a reason), its
final transition counted once (stats), each item of a done job is in its run's results stream
exactly once, nothing is pending or queued, and Redis's used_memory is under a stated bound.

    python bench/chaos.py --minutes 10            # writes runs/chaos.json, exit 1 on any finding
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import redis

from actgen_shared import codecs
from actgen_shared.client import GeneratorClient
from actgen_shared.keys import CONSUMER_GROUP, Keys
from actgen_shared.launcher import GeneratorProcess, GeneratorStartError
from actgen_shared.redis_embedded import EmbeddedRedis

PREFIX = "chaos:"
LEASE_S = 3.0
FAULTS = ("kill", "term", "redis", "pause")
MEMORY_BOUND_MB = 64.0  # used_memory after the run: jobs, results and banks of a few hundred jobs


class Pool:
    """The replicas, each slot restarted after a kill or a stop."""

    def __init__(self, redis_url: str, size: int, env: dict[str, str], log: Any) -> None:
        self.redis_url, self.env, self.log = redis_url, env, log
        self.slots: list[GeneratorProcess | None] = [None] * size
        self.lock = threading.Lock()

    def _new(self) -> GeneratorProcess:
        return GeneratorProcess(redis_url=self.redis_url, env=self.env, extra_args=["--sampler", "echo"])

    def start(self, slot: int, attempts: int = 5) -> None:
        for attempt in range(attempts):
            proc = self._new()
            try:
                proc.start()
            except GeneratorStartError as exc:  # e.g. Redis was restarting: try again
                self.log(f"slot {slot}: start failed ({str(exc).splitlines()[0]}), retrying")
                proc.stop()
                time.sleep(1 + attempt)
                continue
            with self.lock:
                self.slots[slot] = proc
            return
        raise RuntimeError(f"replica slot {slot} would not start")

    def urls(self) -> list[str]:
        with self.lock:
            return [p.url for p in self.slots if p is not None and p.alive()]

    def stop_all(self) -> None:
        for proc in self.slots:
            if proc is not None:
                if proc.process is not None and proc.alive():
                    proc.process.send_signal(signal.SIGCONT)
                proc.stop()


def _job(run_id: str, key: str, rng: random.Random) -> dict[str, Any]:
    n = rng.randint(1, 4)
    guide = codecs.png_to_b64(np.full((16, 16, 3), rng.randrange(256), dtype=np.uint8))
    return {
        "run_id": run_id,
        "epoch": 0,
        "label_set": "digits",
        "idempotency_key": key,
        "memory_bank_key": run_id,
        "items": [{"image": guide, "class_id": rng.randrange(10), "guide_id": f"g{k}"} for k in range(n)],
        "options": {
            "mode": "random",
            "num_inference_steps": rng.randint(10, 30),
            "grad_steps": 0,
            "height": 64,
            "width": 64,
            "seed": rng.randrange(2**31),
        },
    }


class Client(threading.Thread):
    """Posts jobs like a trainer until told to stop; each key is retried until accepted."""

    def __init__(self, pool: Pool, runs: int, every_s: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.pool, self.runs, self.every_s = pool, runs, every_s
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.accepted: dict[str, str] = {}  # idempotency key -> job id
        self.retries = 0

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            run_id = f"chaos-run-{k % self.runs}"
            key = f"chaos-{k}"
            body = _job(run_id, key, self.rng)
            give_up: float | None = None
            while key not in self.accepted:
                urls = self.pool.urls()
                if urls:
                    try:
                        with GeneratorClient(self.rng.choice(urls), timeout_s=10) as client:
                            self.accepted[key] = client.submit(body).job_id
                            break
                    except Exception:
                        pass
                self.retries += 1
                if self.stop.is_set():  # the end: finish this key if the pool lets us soon
                    give_up = give_up or time.monotonic() + 30
                    if time.monotonic() > give_up:
                        return
                time.sleep(0.3)
            k += 1
            self.stop.wait(self.every_s)


def _fault(kind: str, pool: Pool, server: EmbeddedRedis, rng: random.Random, log: Any) -> bool:
    alive = [i for i, p in enumerate(pool.slots) if p is not None and p.alive()]
    if kind == "redis":
        server.stop()  # SIGTERM: Redis writes its AOF and exits
        time.sleep(rng.uniform(0.5, 2.0))
        server.start()
        return True
    if not alive:
        return False
    slot = rng.choice(alive)
    proc = pool.slots[slot]
    assert proc is not None and proc.process is not None
    if kind == "pause":
        proc.process.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_S + rng.uniform(1.0, 3.0))  # past its lease: its jobs are reclaimed
        proc.process.send_signal(signal.SIGCONT)
        return True
    if kind == "kill":
        proc.kill()
    else:
        proc.terminate(timeout_s=30)
    proc.stop()
    time.sleep(rng.uniform(0.2, 1.5))
    pool.start(slot)
    return True


def audit(url: str, accepted: dict[str, str], memory_bound_mb: float) -> dict[str, Any]:
    """What Redis says after the drain: lost, duplicated, stuck, pending, memory."""
    r = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    try:
        job_ids = set(accepted.values())
        statuses: Counter[str] = Counter()
        lost, stuck, failed_without_reason, failures = [], [], [], []
        done_items: dict[tuple[str, int], int] = {}
        runs: set[str] = set()
        redelivered = 0  # jobs started more than once (taken over after a kill or a pause)
        for job_id in sorted(job_ids):
            status, error, n_items, run_id, deliveries = (
                (v.decode() if v is not None else None)
                for v in r.hmget(keys.job(job_id), "status", "error", "n_items", "run_id", "deliveries")
            )
            redelivered += int(deliveries or 0) >= 2
            if status is None:
                lost.append(job_id)
                continue
            statuses[status] += 1
            runs.add(run_id or "")
            if status not in ("done", "failed", "cancelled"):
                stuck.append(job_id)
            elif status == "failed":
                (failures if error else failed_without_reason).append((job_id, error))
            elif status == "done":
                for k in range(int(n_items or 0)):
                    done_items[(job_id, k)] = 0
        extra = Counter()
        for run_id in runs:
            for _, fields in r.xrange(keys.run_results(run_id)):
                item = (fields[b"job_id"].decode(), int(fields[b"index"]))
                if item in done_items:
                    done_items[item] += 1
                else:
                    extra[item] += 1
        missing = [item for item, n in done_items.items() if n == 0]
        duplicated = [item for item, n in done_items.items() if n > 1] + [
            i for i, n in extra.items() if n > 1
        ]
        stats = {k.decode(): int(v) for k, v in r.hgetall(keys.jobs_by_status).items()}
        pending = int(r.xpending(keys.jobs_stream, CONSUMER_GROUP)["pending"])
        used_mb = int(r.info("memory")["used_memory"]) / 2**20
        final_total = sum(stats.get(s, 0) for s in ("done", "failed", "cancelled"))
        findings = {
            "lost": len(lost) + len(missing),
            "duplicated": len(duplicated) + max(0, final_total - len(job_ids)),
            "stuck": len(stuck)
            + pending
            + stats.get("queued", 0)
            + stats.get("running", 0)
            + int(r.xlen(keys.jobs_stream)),
            "failed_without_reason": len(failed_without_reason),
            "memory_over_bound": int(used_mb > memory_bound_mb),
        }
        return {
            "jobs": len(job_ids),
            "items": len(done_items),
            "statuses": dict(statuses),
            "stats": stats,
            "redelivered": redelivered,
            "pending": pending,
            "used_memory_mb": round(used_mb, 2),
            "memory_bound_mb": memory_bound_mb,
            "findings": findings,
            "failures": [{"job_id": j, "error": e} for j, e in failures[:10]],
            "examples": {
                "lost": lost[:5],
                "missing_items": missing[:5],
                "duplicated": duplicated[:5],
                "stuck": stuck[:5],
            },
            "ok": not any(findings.values()),
        }
    finally:
        r.close()


def run_chaos(
    seconds: float,
    replicas: int = 3,
    seed: int = 0,
    fault_every_s: tuple[float, float] = (4.0, 9.0),
    drain_s: float = 240.0,
    memory_bound_mb: float = MEMORY_BOUND_MB,
    log: Any = print,
) -> dict[str, Any]:
    rng = random.Random(seed)
    env = {
        "ACTGEN_KEY_PREFIX": PREFIX,
        "ACTGEN_LEASE_S": str(LEASE_S),
        "ACTGEN_HEARTBEAT_S": "0.5",
        "ACTGEN_PENDING_RESCAN_S": "5",
        "ACTGEN_MAX_BATCH": "4",
        "ACTGEN_ECHO_STEP_S": "0.05",
        "ACTGEN_MAX_DELIVERIES": "6",
        "ACTGEN_RESULT_TTL_S": "86400",
        "ACTGEN_DEVICE": "cpu",
    }
    faults: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="actgen-chaos-") as tmp:
        server = EmbeddedRedis(data_dir=Path(tmp) / "redis", appendonly=True).start()
        pool = Pool(server.url, replicas, env, log)
        client: Client | None = None
        try:
            for slot in range(replicas):
                pool.start(slot)
            client = Client(pool, runs=3, every_s=0.4, seed=seed)
            client.start()
            began = time.monotonic()
            order: list[str] = []
            while time.monotonic() - began < seconds:
                time.sleep(rng.uniform(*fault_every_s))
                if not order:  # every kind once per round, in a random order
                    order = rng.sample(FAULTS, len(FAULTS))
                kind = order.pop()
                if _fault(kind, pool, server, rng, log):
                    faults[kind] += 1
                    log(
                        f"[chaos] {time.monotonic() - began:6.1f}s {kind:5s} (faults {sum(faults.values())}, "
                        f"jobs {len(client.accepted)})"
                    )
            client.stop.set()
            client.join(timeout=60)
            for slot, proc in enumerate(pool.slots):  # everyone back for the drain
                if proc is None or not proc.alive():
                    pool.start(slot)
            accepted = dict(client.accepted)
            deadline = time.monotonic() + drain_s
            r = redis.Redis.from_url(server.url)
            keys = Keys(PREFIX)
            try:
                while time.monotonic() < deadline:
                    open_jobs = [
                        j
                        for j in accepted.values()
                        if (r.hget(keys.job(j), "status") or b"").decode() in ("queued", "running")
                    ]
                    if not open_jobs:
                        break
                    time.sleep(0.5)
            finally:
                r.close()
            drained_s = round(drain_s - max(0.0, deadline - time.monotonic()), 1)
            report = audit(server.url, accepted, memory_bound_mb)
        finally:
            if client is not None:
                client.stop.set()
            pool.stop_all()
            server.cleanup()
    report.update(
        {
            "seconds": seconds,
            "replicas": replicas,
            "seed": seed,
            "faults": dict(faults),
            "faults_total": sum(faults.values()),
            "drain_seconds": drained_s,
            "submit_retries": client.retries if client else 0,
            "redis_restart": "SIGTERM (AOF appendfsync everysec)",
            "lease_s": LEASE_S,
        }
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long faults are injected")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/chaos.json")
    args = parser.parse_args(argv)
    report = run_chaos(args.minutes * 60, replicas=args.replicas, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    f = report["findings"]
    print(
        f"[chaos] {report['jobs']} jobs ({report['items']} items done), {report['faults_total']} faults "
        f"{report['faults']}: lost {f['lost']}, duplicated {f['duplicated']}, stuck {f['stuck']}, "
        f"failed without reason {f['failed_without_reason']}, statuses {report['statuses']}, "
        f"redelivered {report['redelivered']}, "
        f"Redis {report['used_memory_mb']} MiB (bound {report['memory_bound_mb']}) -> {out}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
