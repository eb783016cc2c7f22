"""``actgen-generator serve``: one replica (API + worker) under uvicorn.

With no ``REDIS_URL`` a private redis-server is started and its URL printed; with no model
the trained tiny digits model shipped in the package is served (the start-up line says which
model, and what it is for). SIGTERM stops the worker at once (its batch is
interrupted at the next step and unfinished jobs go back to the queue), then uvicorn drains.

The environment and the model's name are checked first, before Redis starts or torch, diffusers
and uvicorn are imported (seconds): a bad ``ACTGEN_*`` value or a model path that does not exist
is one line naming it and exit status 2, at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

from actgen_generator.contract import SAMPLERS
from actgen_generator.model_source import ModelSourceError, describe_model, resolve_model_source, serve_model

if TYPE_CHECKING:  # pragma: no cover
    import uvicorn

    from actgen_generator.api import Service
    from actgen_shared.settings import Settings

GRACEFUL_SHUTDOWN_S = 5


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run a generator replica (REST API + worker)",
        description="Run one generator replica: the REST API and (unless --no-worker) a worker holding the "
        "model. Settings come from ACTGEN_* variables (docs/operations.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--model",
        default=None,
        help="hub id, diffusers folder, .safetensors/.ckpt file, or 'tiny' (random weights, for tests) "
        "(default: ACTGEN_MODEL, else the trained digits model shipped in the package)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="auto, cpu, cuda, cuda:1 ... (default: ACTGEN_DEVICE, else auto: CUDA when present)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weights dtype (default: ACTGEN_DTYPE or the pipeline's choice)",
    )
    parser.add_argument(
        "--no-worker", action="store_true", help="API only: accept and serve jobs, never run them"
    )
    parser.add_argument(
        "--sampler",
        default="guided",
        choices=SAMPLERS,
        help="'echo' returns guides without a model (to measure service overhead)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    parser.set_defaults(func=run)


def docs_note(settings: Settings) -> str:
    """Where the interactive docs are and who may read them (the API key guards them unless public)."""
    if settings.api_key and not settings.public_docs:
        return "docs at /docs with the API key; ACTGEN_PUBLIC_DOCS=1 makes them public"
    return "docs at /docs"


def run(args: argparse.Namespace) -> int:
    from actgen_shared.settings import Settings

    settings = Settings.from_env()  # SettingsError: the CLI prints it, exit 2
    if not args.no_worker and args.sampler == "guided":
        try:  # no model named: the packaged trained digits model (or a refusal), never noise
            args.model = serve_model(args.model or settings.model)
            resolve_model_source(args.model, settings.model_revision)
        except ModelSourceError as exc:
            print(f"actgen-generator serve: error: {exc}", file=sys.stderr)
            return 2
    return _serve(args, settings)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from actgen_generator import events
    from actgen_generator.api import claim_replica_id, create_app
    from actgen_generator.api.tenants import KeysError
    from actgen_generator.durability import DurableAckUnavailable, probe_durable_ack
    from actgen_shared.queue import ReplicaIdInUse
    from actgen_shared.redis_embedded import EmbeddedRedis

    events.configure()
    embedded = None
    app: object = None
    if not settings.redis_url:
        embedded = EmbeddedRedis().start()
        settings = settings.model_copy(update={"redis_url": embedded.url})
        print(f"embedded Redis at {embedded.url}", flush=True)
    try:
        try:
            app = create_app(
                settings,
                worker=not args.no_worker,
                sampler=args.sampler,
                model=args.model,
                device=args.device,
                dtype=args.dtype,
            )
        except KeysError as exc:  # ACTGEN_API_KEYS does not parse: one line naming the entry
            print(f"actgen-generator serve: error: {exc}", file=sys.stderr)
            return 2
        svc: Service = app.state.service
        if settings.durable_ack:  # before the port opens: a Redis without WAITAOF is one line
            try:
                svc.durable = probe_durable_ack(settings)
            except DurableAckUnavailable as exc:
                print(f"actgen-generator serve: error: {exc}", file=sys.stderr)
                return 2
        try:
            claim_replica_id(svc)  # before the port opens: a name in use is refused, clearly
        except ReplicaIdInUse as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        server = _server(app, svc, args)
        # uvicorn re-raises the signal after its graceful shutdown: make that a clean exit 0
        signal.signal(signal.SIGTERM, _exit_after_shutdown)
        svc.on_fatal = lambda: setattr(server, "should_exit", True)
        serving = ""
        if not args.no_worker and args.sampler == "guided":
            serving = f", model {describe_model(args.model, settings.model_revision).line()}"
        print(
            f"generator {svc.replica_id} on http://{args.host}:{args.port} ({docs_note(settings)}){serving}",
            flush=True,
        )
        server.run()
        if svc.fatal:
            print(f"error: {svc.fatal}", file=sys.stderr)
            return 1
        return 0
    finally:
        if embedded is not None:
            embedded.cleanup()
        if svc_hung(app):
            # a batch thread is stuck in a kernel: nothing at exit may wait on the device
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)


def svc_hung(app: object) -> bool:
    """Whether the replica's worker gave up on a hung batch (its thread is still stuck)."""
    svc = getattr(getattr(app, "state", None), "service", None)
    worker = getattr(svc, "worker", None)
    return bool(getattr(worker, "hung", False))


def _exit_after_shutdown(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _server(app: object, svc: Service, args: argparse.Namespace) -> uvicorn.Server:
    """uvicorn's server for ``app``, which also stops the worker the moment a signal arrives."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if svc.worker is not None:
                svc.worker.request_stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,  # type: ignore[arg-type]  # a FastAPI app: an ASGI application
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
        # past this many connections and tasks at once uvicorn answers 503 at once (ACTGEN_LIMIT_CONCURRENCY)
        limit_concurrency=svc.settings.limit_concurrency,
    )
    return Server(config)


__all__ = ["GRACEFUL_SHUTDOWN_S", "add_parser", "docs_note", "run"]
