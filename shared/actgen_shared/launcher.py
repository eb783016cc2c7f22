"""Start a generator replica (``actgen-generator serve``) as a child process on loopback.

The trainer's demo and the tests use this to run real uvicorn servers: it picks a free port,
waits for ``/readyz``, and can stop the replica gracefully (SIGTERM) or kill it (SIGKILL) the
way a crash would. The replica's stdout/stderr go to a log file so a failed start can say why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from actgen_shared.redis_embedded import free_port

DEFAULT_STARTUP_TIMEOUT_S = 180.0


class GeneratorStartError(RuntimeError):
    """The replica exited or did not become ready; the message carries its log tail."""


class GeneratorProcess:
    """One ``actgen-generator serve`` child process; use as a context manager.

        ``env`` entries are added to (not replacing) the current environment; ``redis_url`` None
        lets the replica start its own embedded Redis. ``model`` None means the random-weight tiny model
    (unless ACTGEN_MODEL names one); ``""`` leaves ``serve`` its default (the shipped digits model).
    """

    def __init__(
        self,
        port: int | None = None,
        redis_url: str | None = None,
        env: Mapping[str, str] | None = None,
        model: str | None = None,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        log_path: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.redis_url = redis_url
        self.env = dict(env or {})
        self.model = model
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if log_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="actgen-generator-")
            log_path = Path(self._tmpdir.name) / "generator.log"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "actgen_generator",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.model:
            args += ["--model", self.model]
        elif self.model is None and not {**os.environ, **self.env}.get("ACTGEN_MODEL"):
            args += ["--model", "tiny"]  # the random-weight tiny model; "" leaves serve its own default
        return args + self.extra_args

    def start(self) -> GeneratorProcess:
        """Start the replica and block until /readyz answers 200."""
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        if self.redis_url is not None:
            env["REDIS_URL"] = self.redis_url
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        self.wait_ready(self.startup_timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise GeneratorStartError(
                        f"generator exited with code {code} before it was ready:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        self.kill()
        raise GeneratorStartError(f"generator on {self.url} not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no release of work, no cleanup."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful: unfinished work goes back to the queue), SIGKILL after timeout."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode if self.process is not None else None

    def stop(self) -> None:
        self.terminate()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> GeneratorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
