"""What eq. 9-11 push against in one batch: the guided items, their memory bank, the step's targets,
and the per-step record of the losses (docs/architecture.md 5). Split from sampler.py, which runs them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from actgen_generator.contract import Classifier, SampleItem
from actgen_shared.schemas import AdvDecoder, GradStepRecord


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for it: a plain copy to a GPU waits for the stream."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def with_banks(
    items: list[SampleItem], banks: Mapping[int, torch.Tensor], group: str | None = None
) -> list[SampleItem]:
    """Give each item its class's latents from one job's memory bank (class id -> (N, C, h, w)).

    With ``group``, the items also count in each other's bank (one job's items in one batch).
    """
    for item in items:
        item.bank = banks.get(item.class_id)
        if group is not None:
            item.bank_group = group
    return items


@dataclass
class GradientTargets:
    """What the gradient-guided items are pushed away from (eq. 9) and against (eq. 10) at one step."""

    class_ids: torch.Tensor  # (G,) labels for the classifier
    bank: torch.Tensor  # (G, N, D) bank latents per item, zero-padded
    valid: torch.Tensor  # (G, N) 1 where bank holds a real latent
    adversarial: torch.Tensor  # (G,) bool: this item uses L_adv
    margin: float  # rho
    adv_weight: float  # lambda
    classifier: Classifier | None = None
    adv_positions: torch.Tensor | None = None  # (A,) adv_rows when known already (no device sync)
    decoder: AdvDecoder = "vae"  # eq. 10's decode: the VAE or the tiny surrogate (options.adv_decoder)

    @property
    def adv_rows(self) -> torch.Tensor:
        """(A,) positions of the adversarial items."""
        if self.adv_positions is None:
            return self.adversarial.nonzero().flatten()
        return self.adv_positions


@dataclass
class GradientPlan:
    """The gradient-guided items of a batch and where their memory bank comes from.

    The bank is live (as the released code's, which appends each latent as it is made): an item's
    bank is its job's stored latents of its class, plus the current x0_hat of the other items of
    the same job and class in this batch (detached), so one job's items repel each other too.
    The padded bank tensor is built once; a step only rewrites the peers' rows (and redraws the
    stored ones of an item whose bank holds more than N).
    """

    rows: torch.Tensor  # (G,) batch positions of the guided items
    keep: torch.Tensor  # (B - G,) batch positions of the others
    row_list: list[int]  # rows, on the host
    adv_list: list[bool]  # adversarial, on the host
    adv_rows: torch.Tensor  # (A,) positions in rows of the adversarial items
    class_ids: torch.Tensor  # (G,)
    adversarial: torch.Tensor  # (G,) bool
    stored: list[torch.Tensor | None]  # per row: (n, D) stored bank latents on the device
    peers: list[torch.Tensor]  # per row: batch positions of its same-job, same-class items
    draws: list[torch.Generator]  # per row: the item's decision stream, for per-step bank draws
    bank_sample: int  # N
    margin: float
    adv_weight: float
    classifier: Classifier | None
    bank: torch.Tensor  # (G, depth, D): per row min(n, N) stored latents, then its peers
    valid: torch.Tensor  # (G, depth) 1 where bank holds a real entry
    decoder: AdvDecoder = "vae"

    @classmethod
    def build(
        cls,
        stored: list[torch.Tensor | None],
        peers: list[torch.Tensor],
        dim: int,
        bank_sample: int,
        device: torch.device,
        **fields,
    ) -> GradientPlan:
        """Lay out the bank once: row r holds min(n_r, N) stored latents, then its peers."""
        kept = [0 if s is None else min(len(s), bank_sample) for s in stored]
        depth = max(1, max(k + len(p) for k, p in zip(kept, peers, strict=True)))
        bank = torch.zeros(len(stored), depth, dim, device=device)
        valid = torch.zeros(len(stored), depth, device=device)
        for r, (s, k, p) in enumerate(zip(stored, kept, peers, strict=True)):
            if s is not None and len(s) <= bank_sample:
                bank[r, :k] = s  # no draw needed: the same entries every step
            valid[r, : k + len(p)] = 1.0
        return cls(stored=stored, peers=peers, bank_sample=bank_sample, bank=bank, valid=valid, **fields)

    def targets(self, x0: torch.Tensor) -> GradientTargets:
        """This step's targets: up to N stored latents (drawn afresh when more), the peers' x0_hat now."""
        flat = x0.detach().flatten(1)
        for r, (stored, peers, draw) in enumerate(zip(self.stored, self.peers, self.draws, strict=True)):
            kept = 0
            if stored is not None:
                kept = min(len(stored), self.bank_sample)
                if len(stored) > self.bank_sample:
                    pick = torch.randperm(len(stored), generator=draw)[: self.bank_sample]
                    self.bank[r, :kept] = stored[to_device(pick, stored.device)]
            if peers.numel():
                self.bank[r, kept : kept + len(peers)] = flat[peers]
        return GradientTargets(
            class_ids=self.class_ids,
            bank=self.bank,
            valid=self.valid,
            adversarial=self.adversarial,
            margin=self.margin,
            adv_weight=self.adv_weight,
            classifier=self.classifier,
            adv_positions=self.adv_rows,
            decoder=self.decoder,
        )


@dataclass
class GradHistory:
    """What gradient guidance did per step and guided item, kept on the device until the batch ends
    (one copy to the host then, not one a step)."""

    contra: torch.Tensor  # (S, G) L_contra
    adv: torch.Tensor  # (S, G) L_adv
    prediction: torch.Tensor  # (S, G) the classifier's class, -1 for non-adversarial items
    zero: torch.Tensor  # (G,) steps whose gradient was all zero
    nonfinite: torch.Tensor  # (G,) steps whose gradient was not finite (their move skipped)

    @classmethod
    def empty(cls, steps: int, rows: int, device: torch.device) -> GradHistory:
        return cls(
            contra=torch.zeros(steps, rows, device=device),
            adv=torch.zeros(steps, rows, device=device),
            prediction=torch.full((steps, rows), -1, dtype=torch.long, device=device),
            zero=torch.zeros(rows, dtype=torch.long, device=device),
            nonfinite=torch.zeros(rows, dtype=torch.long, device=device),
        )

    def add(self, step: int, loss: GuidanceLoss, finite: torch.Tensor, zero: torch.Tensor) -> None:
        self.contra[step] = loss.contra.detach()
        self.adv[step] = loss.adv.detach()
        self.prediction[step] = loss.prediction
        self.zero += zero
        self.nonfinite += ~finite

    def per_item(
        self, n_items: int, rows: list[int], adversarial: list[bool]
    ) -> tuple[list[list[GradStepRecord]], list[int], list[int]]:
        """Each item's step records and its zero and non-finite step counts (rows: guided items)."""
        records: list[list[GradStepRecord]] = [[] for _ in range(n_items)]
        zero, nonfinite = [0] * n_items, [0] * n_items
        contra, adv, pred = (
            self.contra.cpu().tolist(),
            self.adv.cpu().tolist(),
            self.prediction.cpu().tolist(),
        )
        zeros, nonfinites = self.zero.cpu().tolist(), self.nonfinite.cpu().tolist()
        for r, item in enumerate(rows):
            zero[item], nonfinite[item] = zeros[r], nonfinites[r]
            for step in range(len(contra)):
                records[item].append(
                    GradStepRecord(
                        step=step,
                        l_contra=contra[step][r],
                        l_adv=adv[step][r] if adversarial[r] else None,
                        prediction=pred[step][r] if adversarial[r] else None,
                    )
                )
        return records, zero, nonfinite


@dataclass
class GuidanceLoss:
    """L = L_contra + lambda L_adv per item, with its parts for provenance."""

    total: torch.Tensor  # (G,)
    contra: torch.Tensor  # (G,)
    adv: torch.Tensor  # (G,), 0 for non-adversarial items
    prediction: torch.Tensor  # (G,), -1 for non-adversarial items
