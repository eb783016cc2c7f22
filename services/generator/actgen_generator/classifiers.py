"""Uploaded classifiers: safetensors-only store in Redis, and a per-replica LRU of loaded models.

A classifier is its weights (safetensors bytes, never pickle) plus :class:`ClassifierMeta`
(an architecture name of ``actgen_shared.architectures``: its registry, or ``timm/<name>``; the
number of classes, input size, mean/std). The reference is ``sha256:<hex>`` of the canonical metadata
JSON followed by the weights, so the same upload always gets the same ref (idempotent) and two
uploads that would behave differently never share one. Weights are checked against the
architecture before they are stored, so a job can only name a classifier that loads.

The check spends no memory on the model (:func:`check_upload`): the architecture is built on
torch's meta device (shapes, no storage), its parameters are counted against
``ACTGEN_MAX_CLASSIFIER_PARAMS``, and its state dict is compared with the safetensors header,
before a byte of the weights is read as tensors. Each tenant has its own classifiers (keys.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio import Redis

from actgen_generator.contract import Classifier
from actgen_shared import codecs
from actgen_shared.keys import DEFAULT_TENANT, Keys
from actgen_shared.schemas import ClassifierMeta, ClassifierRef

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


REF_PREFIX = "sha256:"
DEFAULT_CACHE_SIZE = 4
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip checkpoints


class ClassifierError(ValueError):
    """An upload that is not a loadable classifier; ``field`` names the part at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def classifier_ref(weights: bytes, meta: ClassifierMeta) -> str:
    """Content address of an upload: sha256 over the canonical metadata JSON and the weights."""
    digest = hashlib.sha256(meta.model_dump_json().encode("utf-8") + b"\0" + weights)
    return REF_PREFIX + digest.hexdigest()


def _hex(ref: str) -> str:
    if not ref.startswith(REF_PREFIX):
        raise ClassifierError("classifier_ref", f"{ref!r} is not of the form sha256:<hex>")
    return ref[len(REF_PREFIX) :]


def _looks_like_pickle(data: bytes) -> bool:
    """PROTO opcode with a protocol 2-5: only asked once the bytes failed to parse as safetensors."""
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def read_state_dict(weights: bytes) -> dict[str, Any]:
    """safetensors bytes -> tensors; anything else is refused unread (never unpickled).

    Recognised by parsing the safetensors header (codecs.safetensors_header); only bytes that
    fail it are named (zip, pickle) to say what they are.
    """
    from safetensors.torch import load

    try:
        codecs.safetensors_header(weights)
    except codecs.DecodeError as exc:
        hint = "only safetensors is accepted (save it with safetensors.torch.save_file)"
        if weights.startswith(_ZIP_MAGIC):
            raise ClassifierError("weights", f"this is a zip (torch.save) checkpoint; {hint}") from None
        if _looks_like_pickle(weights):
            raise ClassifierError("weights", f"this is a pickle; {hint}") from None
        raise ClassifierError("weights", f"not a safetensors file ({exc}); {hint}") from None
    try:
        tensors = load(weights)
    except Exception as exc:
        raise ClassifierError("weights", f"not a safetensors file ({exc})") from None
    if not tensors:
        raise ClassifierError("weights", "the safetensors file holds no tensors")
    return tensors


def build_checked(weights: bytes, meta: ClassifierMeta) -> nn.Module:
    """The classifier rebuilt from the registry with the weights loaded strictly (eval mode)."""
    from actgen_shared.architectures import check_architecture, load_classifier

    try:  # a registry name or timm/<a name of timm.list_models()>: never code from the request
        check_architecture(meta.architecture)
    except ValueError as exc:
        raise ClassifierError("metadata.architecture", str(exc)) from None
    state_dict = read_state_dict(weights)
    try:
        return load_classifier(meta.architecture, meta.num_classes, state_dict)
    except (ValueError, RuntimeError) as exc:
        raise ClassifierError("weights", str(exc)) from None


def _header_shapes(weights: bytes) -> dict[str, tuple[int, ...]]:
    """name -> shape of each tensor the safetensors header announces, checked to fit the file."""
    try:
        header = codecs.safetensors_header(weights)
    except codecs.DecodeError:
        read_state_dict(weights)  # raises the ClassifierError that says what the bytes are
        raise  # pragma: no cover  (read_state_dict raised)
    data_bytes = len(weights) - 8 - int.from_bytes(weights[:8], "little")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        assert isinstance(entry, dict)
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise ClassifierError("weights", f"not a safetensors file (header entry {name!r} is malformed)")
        shapes[name] = tuple(shape)
    if not shapes:
        raise ClassifierError("weights", "the safetensors file holds no tensors")
    return shapes


def check_upload(weights: bytes, meta: ClassifierMeta, max_params: int) -> int:
    """Whether an upload can be the named classifier, at no cost in memory: the header's tensors
    against the architecture built on the meta device. Returns its parameter count; raises
    ClassifierError naming the field (the architecture over ``max_params`` included)."""
    import torch

    from actgen_shared.architectures import build_classifier, check_architecture

    given = _header_shapes(weights)
    try:  # a registry name or timm/<a name of timm.list_models()>: never code from the request
        check_architecture(meta.architecture)
    except ValueError as exc:
        raise ClassifierError("metadata.architecture", str(exc)) from None
    try:
        with torch.device("meta"):  # shapes only: no storage, no initialisation work
            model = build_classifier(meta.architecture, meta.num_classes)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise ClassifierError("metadata.architecture", f"cannot be built: {exc}") from None
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > max_params:
        raise ClassifierError(
            "metadata.architecture",
            f"{meta.architecture} with {meta.num_classes} classes has {n_params} parameters, more "
            f"than this service's cap of {max_params} (ACTGEN_MAX_CLASSIFIER_PARAMS)",
        )
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k} {given[k]} for {expected[k]}"
        for k in sorted(set(expected) & set(given))
        if given[k] != expected[k]
    ]
    if missing or unexpected or shapes:

        def few(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"

        parts = [
            f"{what} {few(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
            if keys
        ]
        raise ClassifierError(
            "weights",
            f"weights do not match {meta.architecture} with {meta.num_classes} classes: {'; '.join(parts)}",
        )
    return n_params


WARM_ARCHITECTURE = "vit_small_patch16_224"  # a timm model of the registry, built once on the meta device


def preload_architectures() -> None:
    """Do once, at start, in the model-loading thread, what the first upload's check would pay
    for: import torch and timm (seconds, some 200 MB), read timm's model list, and build one timm
    model on the meta device (torch's first meta-device initialisation is slow). An upload then
    costs a meta-device build of its own architecture only."""
    import torch

    from actgen_shared.architectures import build_classifier

    try:
        import timm  # noqa: F401
    except ImportError:
        return
    with torch.device("meta"):
        build_classifier(WARM_ARCHITECTURE, 10)


# Delete a classifier unless a queued or running job uses it.
# KEYS: bytes, meta, jobs set, then the job hash of each member ; ARGV: the members' job ids
# returns {'deleted'} | {'gone'} | {'changed'} (the set moved: read it again) | {'busy', ids...}
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[3])
  return {'gone'}
end
if redis.call('SCARD', KEYS[3]) ~= #ARGV then return {'changed'} end
local busy = {'busy'}
for i, id in ipairs(ARGV) do
  local status = redis.call('HGET', KEYS[3 + i], 'status')
  if status == 'queued' or status == 'running' then table.insert(busy, id)
  else redis.call('SREM', KEYS[3], id) end
end
if #busy > 1 then return busy end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {'deleted'}
"""


class ClassifierInUse(Exception):
    """A delete refused: queued or running jobs still use the classifier (their ids)."""

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__(f"{len(job_ids)} queued or running jobs use it")
        self.job_ids = job_ids


class ClassifierStore:
    """Classifier checkpoints in Redis under ``clf:{sha256}`` (bytes) and ``clf:{sha256}:meta``.

    Bounded: both keys expire ``ttl_s`` after the last upload, submit or start that used them
    (submit and the worker refresh it while a job holds the classifier), and a client deletes
    what it no longer needs (a delete is refused while a queued or running job uses it).
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        max_bytes: int,
        ttl_s: int = 3 * 24 * 3600,
        max_params: int = 200_000_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_params = max_params
        self._delete = redis.register_script(_DELETE)

    def _keys(self, ref: str, tenant: str) -> tuple[str, str, str]:
        """(bytes, meta, jobs set) keys of a ref in a tenant."""
        k, hex_ = self.keys.for_tenant(tenant), _hex(ref)
        return k.classifier(hex_), k.classifier_meta(hex_), k.classifier_jobs(hex_)

    async def put(self, weights: bytes, meta: ClassifierMeta, tenant: str = DEFAULT_TENANT) -> ClassifierRef:
        """Validate and store an upload; uploading the same thing again returns the same ref.

        Validation builds nothing for real (:func:`check_upload`): what a replica loads later
        is known to fit before it is stored."""
        if len(weights) > self.max_bytes:
            raise ClassifierError("weights", f"{len(weights)} bytes, more than {self.max_bytes}")
        if not weights:
            raise ClassifierError("weights", "empty file")
        ref = classifier_ref(weights, meta)
        blob, meta_key, _ = self._keys(ref, tenant)
        if await self.redis.exists(meta_key, blob) < 2:
            await asyncio.to_thread(check_upload, weights, meta, self.max_params)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(blob, weights, ex=self.ttl_s)
                pipe.set(meta_key, meta.model_dump_json(), ex=self.ttl_s)
                await pipe.execute()
        else:
            await self.touch(ref, tenant=tenant)
        return ClassifierRef(ref=ref, architecture=meta.architecture, num_classes=meta.num_classes)

    async def meta(self, ref: str, tenant: str = DEFAULT_TENANT) -> ClassifierMeta | None:
        raw = await self.redis.get(self._keys(ref, tenant)[1])
        return None if raw is None else ClassifierMeta.model_validate(json.loads(raw))

    async def weights(self, ref: str, tenant: str = DEFAULT_TENANT) -> bytes | None:
        return cast(bytes | None, await self.redis.get(self._keys(ref, tenant)[0]))

    async def touch(self, *refs: str, tenant: str = DEFAULT_TENANT) -> None:
        """Start the TTL of these classifiers again (they are in use)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                for key in self._keys(ref, tenant):
                    pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def delete(self, ref: str, job_key: Callable[[str], str], tenant: str = DEFAULT_TENANT) -> bool:
        """Delete a classifier; False if it was not there, ClassifierInUse while jobs use it.

        ``job_key``: job id -> its hash key (jobs that are final or gone no longer count).
        """
        base = list(self._keys(ref, tenant))
        for _ in range(10):  # the set moved under us (a submit): read it again
            members = sorted(m.decode() for m in cast(set[bytes], await self.redis.smembers(base[2])))
            reply = await self._delete(keys=base + [job_key(m) for m in members], args=members)
            outcome = reply[0].decode()
            if outcome == "busy":
                raise ClassifierInUse([r.decode() for r in reply[1:]])
            if outcome != "changed":
                return outcome == "deleted"
        raise ClassifierInUse(["(busy: jobs keep being submitted with it)"])


class ClassifierCache:
    """Loaded classifiers of this replica, at most ``size``, least recently used dropped first.

    Each ref is read from Redis and built at most once while it stays cached; concurrent
    requests for the same ref wait on one load.
    """

    def __init__(self, store: ClassifierStore, device: str, size: int = DEFAULT_CACHE_SIZE) -> None:
        self.store = store
        self.device = device
        self.size = size
        self._cache: OrderedDict[str, Classifier] = OrderedDict()
        self._lock = asyncio.Lock()
        self.loads = 0

    async def get(self, ref: str, tenant: str = DEFAULT_TENANT) -> Classifier:
        """The tenant's classifier ``ref``, loaded on this replica's device."""
        key = f"{tenant}/{ref}"
        async with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            meta = await self.store.meta(ref, tenant)
            weights = await self.store.weights(ref, tenant)
            if meta is None or weights is None:
                raise ClassifierError("classifier_ref", f"{ref} is not known to this service")
            classifier = await asyncio.to_thread(self._load, ref, weights, meta)
            self.loads += 1
            self._cache[key] = classifier
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
            return classifier

    def _load(self, ref: str, weights: bytes, meta: ClassifierMeta) -> Classifier:
        module = build_checked(weights, meta).to(self.device)
        for param in module.parameters():
            param.requires_grad_(False)
        return Classifier(
            module=module,
            input_size=meta.input_size,
            mean=meta.mean,
            std=meta.std,
            ref=ref,
        )
