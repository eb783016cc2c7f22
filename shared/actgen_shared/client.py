"""Python client of the generator API (docs/architecture.md section 3), sync and async, on httpx.

The trainer and the tests talk to the service through this only. Every non-2xx answer is
raised as :class:`GeneratorError` carrying the server's ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import numpy as np

from actgen_shared import codecs
from actgen_shared.schemas import (
    START_CURSOR,
    ClassifierMeta,
    ClassifierRef,
    Info,
    JobAccepted,
    JobRequest,
    JobState,
    MemoryBankInfo,
    ResultsPage,
)

DEFAULT_TIMEOUT_S = 30.0
CONNECT_RETRIES = 2


class GeneratorError(RuntimeError):
    """A request the generator refused or could not answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def is_retryable(exc: BaseException) -> bool:
    """The one retry rule: trouble on the server's side or the network's, which passes by
    itself (a replica that is starting, or whose Redis is restarting, answers 503; a replica at
    its cap of long-polls or a tenant at its quota answers 429), is worth waiting out; another
    4xx is the request's fault and is not."""
    if isinstance(exc, GeneratorError):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, httpx.TransportError)


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    code, message = "http_error", response.text[:500]
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        pass
    raise GeneratorError(response.status_code, code, message)


def _job_body(request: JobRequest | Mapping[str, Any]) -> bytes:
    """The JSON body of POST /v1/jobs (pydantic writes a model's own JSON, no dict between)."""
    if isinstance(request, JobRequest):
        return request.model_dump_json(exclude_none=True).encode()
    return json.dumps(dict(request), separators=(",", ":"), allow_nan=False).encode()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


JSON_HEADERS = {"Content-Type": "application/json"}


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context every client of this process shares (httpx's default: certifi's CAs, or
    SSL_CERT_FILE / SSL_CERT_DIR). Building one loads the CA bundle, about 25 ms of CPU, which
    httpx would otherwise spend on every client it makes, for http:// URLs too."""
    return httpx.create_ssl_context()


def _classifier_files(weights: bytes, meta: ClassifierMeta | Mapping[str, Any]) -> tuple[dict, dict]:
    meta_json = meta.model_dump_json() if isinstance(meta, ClassifierMeta) else json.dumps(dict(meta))
    files = {"weights": ("classifier.safetensors", weights, "application/octet-stream")}
    return files, {"metadata": meta_json}


def _results_params(after: str, limit: int, wait_s: float) -> dict[str, Any]:
    return {"after": after, "limit": limit, "wait": wait_s}


def _latents(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    tensors = codecs.tensors_decode(data)
    return tensors["latents"], tensors["indices"]


class GeneratorClient:
    """Blocking client; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.has_api_key = bool(api_key)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=_headers(api_key),
            timeout=timeout_s,
            transport=transport or httpx.HTTPTransport(retries=CONNECT_RETRIES, verify=tls_context()),
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    # --- service ------------------------------------------------------------------------
    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> Info:
        return Info.model_validate_json(self._request("GET", "/v1/info").content)

    # --- jobs ---------------------------------------------------------------------------
    def submit(self, request: JobRequest | Mapping[str, Any]) -> JobAccepted:
        response = self._request("POST", "/v1/jobs", content=_job_body(request), headers=JSON_HEADERS)
        return JobAccepted.model_validate_json(response.content)

    def status(self, job_id: str, timeout_s: float | None = None) -> JobState:
        """The job's state; ``timeout_s`` bounds this request (default: the client's timeout)."""
        kwargs: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        return JobState.model_validate_json(self._request("GET", f"/v1/jobs/{job_id}", **kwargs).content)

    def cancel(self, job_id: str) -> JobState:
        return JobState.model_validate_json(self._request("DELETE", f"/v1/jobs/{job_id}").content)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.1) -> JobState:
        """Poll until the job is done, failed or cancelled; TimeoutError after ``timeout_s``.

        Retryable trouble (503 while Redis restarts, a dropped connection) is waited out.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                state = self.status(job_id)
            except Exception as exc:  # a restarting replica or Redis: keep waiting
                if not is_retryable(exc) or (deadline is not None and time.monotonic() > deadline):
                    raise
                time.sleep(max(poll_s, 0.5))
                continue
            if state.status.is_final:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state.status.value} after {timeout_s}s")
            time.sleep(poll_s)

    def image(self, job_id: str, index: int) -> bytes:
        """PNG bytes of the job's ``index``-th image."""
        return self._request("GET", f"/v1/jobs/{job_id}/images/{index}.png").content

    def latents(self, job_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(latents (N,C,h,w) float16, indices (N,)) of the job."""
        return _latents(self._request("GET", f"/v1/jobs/{job_id}/latents").content)

    # --- results ------------------------------------------------------------------------
    def results(
        self,
        run_id: str,
        after: str = START_CURSOR,
        limit: int = 100,
        wait_s: float = 0.0,
        timeout_s: float | None = None,
    ) -> ResultsPage:
        """Finished items of a run after ``after``, long-polling up to ``wait_s`` seconds;
        ``timeout_s`` bounds the whole request (default: the client's timeout plus ``wait_s``)."""
        if timeout_s is None:
            timeout_s = self._http.timeout.read + wait_s if self._http.timeout.read else None
        response = self._request(
            "GET",
            f"/v1/runs/{run_id}/results",
            params=_results_params(after, limit, wait_s),
            timeout=timeout_s,
        )
        return ResultsPage.model_validate_json(response.content)

    def iter_results(
        self, run_id: str, after: str = START_CURSOR, limit: int = 100, wait_s: float = 5.0
    ) -> Iterator[ResultsPage]:
        """Pages of results forever (the caller stops); each page's ``next`` is the cursor."""
        while True:
            page = self.results(run_id, after=after, limit=limit, wait_s=wait_s)
            after = page.next
            yield page

    # --- classifiers and memory banks ---------------------------------------------------
    def upload_classifier(self, weights: bytes, meta: ClassifierMeta | Mapping[str, Any]) -> ClassifierRef:
        files, data = _classifier_files(weights, meta)
        response = self._request("POST", "/v1/classifiers", files=files, data=data)
        return ClassifierRef.model_validate_json(response.content)

    def classifier_known(self, ref: str) -> bool:
        """Whether the generator still holds an uploaded classifier (False: 404)."""
        response = self._http.request("GET", f"/v1/classifiers/{ref}")
        if response.status_code == 404:
            return False
        _raise_for(response)
        return True

    def delete_classifier(self, ref: str) -> bool:
        """Delete an uploaded classifier: True deleted, False unknown (already gone);
        GeneratorError 409 while a queued or running job uses it."""
        response = self._http.request("DELETE", f"/v1/classifiers/{ref}")
        if response.status_code == 404:
            return False
        _raise_for(response)
        return True

    def memory_bank(self, key: str) -> MemoryBankInfo:
        return MemoryBankInfo.model_validate_json(self._request("GET", f"/v1/memory-banks/{key}").content)

    def clear_memory_bank(self, key: str) -> None:
        self._request("DELETE", f"/v1/memory-banks/{key}")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GeneratorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGeneratorClient:
    """The same calls as :class:`GeneratorClient`, awaitable."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.has_api_key = bool(api_key)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_headers(api_key),
            timeout=timeout_s,
            transport=transport or httpx.AsyncHTTPTransport(retries=CONNECT_RETRIES, verify=tls_context()),
        )

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def info(self) -> Info:
        return Info.model_validate_json((await self._request("GET", "/v1/info")).content)

    async def submit(self, request: JobRequest | Mapping[str, Any]) -> JobAccepted:
        response = await self._request("POST", "/v1/jobs", content=_job_body(request), headers=JSON_HEADERS)
        return JobAccepted.model_validate_json(response.content)

    async def status(self, job_id: str) -> JobState:
        return JobState.model_validate_json((await self._request("GET", f"/v1/jobs/{job_id}")).content)

    async def cancel(self, job_id: str) -> JobState:
        return JobState.model_validate_json((await self._request("DELETE", f"/v1/jobs/{job_id}")).content)

    async def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.1) -> JobState:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                state = await self.status(job_id)
            except Exception as exc:  # a restarting replica or Redis: keep waiting
                if not is_retryable(exc) or (deadline is not None and time.monotonic() > deadline):
                    raise
                await asyncio.sleep(max(poll_s, 0.5))
                continue
            if state.status.is_final:
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state.status.value} after {timeout_s}s")
            await asyncio.sleep(poll_s)

    async def image(self, job_id: str, index: int) -> bytes:
        return (await self._request("GET", f"/v1/jobs/{job_id}/images/{index}.png")).content

    async def latents(self, job_id: str) -> tuple[np.ndarray, np.ndarray]:
        return _latents((await self._request("GET", f"/v1/jobs/{job_id}/latents")).content)

    async def results(
        self, run_id: str, after: str = START_CURSOR, limit: int = 100, wait_s: float = 0.0
    ) -> ResultsPage:
        response = await self._request(
            "GET",
            f"/v1/runs/{run_id}/results",
            params=_results_params(after, limit, wait_s),
            timeout=self._http.timeout.read + wait_s if self._http.timeout.read else None,
        )
        return ResultsPage.model_validate_json(response.content)

    async def iter_results(
        self, run_id: str, after: str = START_CURSOR, limit: int = 100, wait_s: float = 5.0
    ) -> AsyncIterator[ResultsPage]:
        while True:
            page = await self.results(run_id, after=after, limit=limit, wait_s=wait_s)
            after = page.next
            yield page

    async def upload_classifier(
        self, weights: bytes, meta: ClassifierMeta | Mapping[str, Any]
    ) -> ClassifierRef:
        files, data = _classifier_files(weights, meta)
        response = await self._request("POST", "/v1/classifiers", files=files, data=data)
        return ClassifierRef.model_validate_json(response.content)

    async def delete_classifier(self, ref: str) -> bool:
        """As :meth:`GeneratorClient.delete_classifier`."""
        response = await self._http.request("DELETE", f"/v1/classifiers/{ref}")
        if response.status_code == 404:
            return False
        _raise_for(response)
        return True

    async def memory_bank(self, key: str) -> MemoryBankInfo:
        response = await self._request("GET", f"/v1/memory-banks/{key}")
        return MemoryBankInfo.model_validate_json(response.content)

    async def clear_memory_bank(self, key: str) -> None:
        await self._request("DELETE", f"/v1/memory-banks/{key}")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncGeneratorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
