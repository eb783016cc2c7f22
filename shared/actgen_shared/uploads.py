"""A run's classifier uploads (docs/architecture.md 10): the model as safetensors with its metadata,
uploaded once per change of weights, its ref shared by every rank, earlier uploads deleted.

A mixin of :class:`~actgen_shared.run.ActGenRun`, whose attributes it reads. torch is imported
only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from actgen_shared.client import GeneratorClient, is_retryable
from actgen_shared.ledger import RunLedger
from actgen_shared.ranks import Ranks
from actgen_shared.schemas import ClassifierMeta

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

T = TypeVar("T")


def model_weights(model: nn.Module) -> bytes:
    """A model's weights as safetensors bytes (never a pickle), unwrapped from DDP."""
    from safetensors.torch import save
    from torch.nn.parallel import DistributedDataParallel

    module = model.module if isinstance(model, DistributedDataParallel) else model
    return save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


class ClassifierUploads:
    """Upload the run's model for gradient guidance, and delete the uploads it no longer needs."""

    client: GeneratorClient
    ranks: Ranks
    ledger: RunLedger
    log: logging.Logger
    architecture: str | None
    num_classes: int
    input_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _classifier: tuple[str, str] | None  # (digest of meta + weights, ref)
    _retry: Callable[..., Any]

    def can_upload(self) -> str | None:
        """Why the model cannot be uploaded (what to pass), None when it can."""
        if self.architecture is None or self.input_size is None:
            return (
                "uploading the model needs architecture= (a name of actgen_shared.architectures) "
                "and input_size= (or image_size=) on the ActGenRun"
            )
        return None

    def _upload(self, model: nn.Module | None) -> str:
        """Upload the model's weights, or reuse the last ref when they did not change."""
        if model is None:
            raise ValueError("rank 0 has no model to upload: pass model= on every rank")
        missing = self.can_upload()
        if missing is not None:
            raise ValueError(missing)
        assert self.architecture is not None and self.input_size is not None
        weights = model_weights(model)
        meta = ClassifierMeta(
            architecture=self.architecture,
            num_classes=self.num_classes,
            input_size=self.input_size,
            mean=_floats(self.mean),
            std=_floats(self.std),
        )
        digest = hashlib.sha256(meta.model_dump_json().encode() + b"\0" + weights).hexdigest()
        if self._classifier is not None and self._classifier[0] == digest:
            last = self._classifier[1]
            known = getattr(self.client, "classifier_known", None)
            if known is None or self._retry(lambda: known(last), "classifier check"):
                return last
            # the generator restarted without its Redis: the same weights go up again
            self.log.warning("the generator no longer holds classifier %s: uploading it again", last)
            self.forget_classifier()
        ref = self._retry(lambda: self.client.upload_classifier(weights, meta).ref, "classifier upload")
        self._classifier = (digest, ref)
        return str(ref)

    def forget_classifier(self) -> None:
        """The generator no longer knows the last upload (it restarted without its Redis): the
        next :meth:`upload` sends the weights again."""
        if self._classifier is not None and self._classifier[1] in self.ledger.classifiers:
            self.ledger.classifiers.remove(self._classifier[1])
        self._classifier = None

    def upload(self, model: nn.Module | None) -> str | None:
        """Collective: rank 0 uploads ``model`` (unless its weights are those of the last upload)
        and every rank gets the ref; the run's earlier classifiers are deleted. None when the
        generator stayed away through the retries (logged); a refusal (4xx) is raised on every rank."""
        outcome: Any = None
        error: BaseException | None = None
        if self.ranks.main:
            try:
                outcome = self._upload(model)
                self.retire_classifiers(keep=outcome)  # earlier uploads: not needed any more
            except Exception as exc:
                if is_retryable(exc):
                    self.log.warning("classifier upload failed (%s); no job this epoch", exc)
                else:
                    error, outcome = exc, ("error", str(exc))
        outcome = self.ranks.broadcast(outcome)
        if isinstance(outcome, (tuple, list)):
            raise error if error is not None else RuntimeError(f"rank 0: {outcome[1]}")
        return outcome

    def retire_classifiers(self, keep: str | None = None) -> None:
        """Delete the classifiers this run uploaded before, except ``keep`` (each can be tens of
        MB). The generator refuses (409) while a job still uses one: it stays listed and is
        tried again after the next upload (or expires on the generator)."""
        s = self.ledger
        if keep is not None and keep not in s.classifiers:
            s.classifiers.append(keep)
        delete = getattr(self.client, "delete_classifier", None)
        if delete is None:
            return
        for ref in [r for r in s.classifiers if r != keep]:
            try:
                delete(ref)
            except Exception as exc:  # in use (409) or unreachable: later
                self.log.info("classifier %s kept for now: %s", ref, exc)
                continue
            s.classifiers.remove(ref)


def _floats(values: Sequence[float]) -> Any:
    return tuple(float(v) for v in values)
