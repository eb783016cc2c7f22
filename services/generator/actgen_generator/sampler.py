"""The ActGen guided DDPM sampler (docs/architecture.md section 5; paper sections 3.2, 4.2, 4.3, A.3, A.4).

One call samples a batch of items of mixed classes. Each step runs the whole batch, CFG
included, through the UNet together; per-item text embeddings let gradient guidance move each
item's own ``c``. Every random draw of an item comes from generators seeded by that item's seed,
so a batch of 8 gives the same images as 8 batches of 1.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from actgen_generator.attention import (
    RECORD_KWARG,
    class_token_weights,
    install_recorder,
    normalize_mask,
    upsample_mask,
)
from actgen_generator.checkpointing import (
    POLICIES,
    Policy,
    set_checkpointing,
    unet_graph_elements,
    vae_decode_graph_elements,
    wants_checkpointing,
)
from actgen_generator.contract import (
    Cancelled,
    Classifier,
    ItemDraw,
    SampleItem,
    SampleOutput,
    decision_stream,
    draw_decisions,
    item_record,
    latent_shape,
)
from actgen_generator.diffusers_classes import DDPMScheduler
from actgen_generator.gradient_plan import (
    GradHistory,
    GradientPlan,
    GradientTargets,
    GuidanceLoss,
    with_banks,
)
from actgen_generator.guidance import (
    PosteriorStep,
    adversarial_loss,
    cfg_noise,
    classifier_input,
    classifier_size_latents,
    contrastive_loss,
    fewshot_strength,
    gamma,
    image_guidance,
    normalized_update,
)
from actgen_generator.guide_fit import fit_guide
from actgen_generator.loss_scale import LossScale, gradient_health, scaled_gradients
from actgen_generator.part_timer import PartTimer
from actgen_generator.pipeline import TINY_VAE_DIR, LoadedModel
from actgen_shared.presets import ModelDefaults, prompt_text, resolve_options
from actgen_shared.schemas import (
    AdvDecoder,
    GenerationOptions,
    GuideFit,
    Mode,
    ResolvedOptions,
)

__all__ = [
    "Cancelled",
    "Classifier",
    "GuidedSampler",
    "SampleItem",
    "SampleOutput",
    "fewshot_strength",
    "with_banks",
]

AdvDecode = Literal["full", "classifier"]
ADV_DECODES: tuple[AdvDecode, ...] = ("full", "classifier")


@dataclass
class NoisePrediction:
    """The UNet's two predictions per item, and the embeddings a gradient step differentiates."""

    uncond: torch.Tensor  # (B, C, h, w) eps(x, 0)
    cond: torch.Tensor  # (B, C, h, w) eps(x, c)
    leaves: tuple[torch.Tensor, ...]  # (c of the guided rows,) or (c, uncond) with update_uncond


@dataclass
class _Draw:
    """An item's random decisions and noise generator."""

    noise: torch.Generator
    decisions: torch.Generator  # read on by the per-step bank draws
    decided: ItemDraw

    @property
    def plain(self) -> bool:
        return self.decided.plain

    @property
    def adversarial(self) -> bool:
        return self.decided.adversarial

    @property
    def strength(self) -> float:
        return self.decided.strength


class GuidedSampler:
    """Samples batches with the modes of the paper: random, ig, aig, actgen."""

    inline = False  # the model's work runs in the worker's thread, off the event loop

    def __init__(
        self,
        model: LoadedModel,
        prompt_cache_size: int = 1024,
        adv_decode: AdvDecode = "full",
        grad_checkpointing: Policy = "auto",
    ) -> None:
        if adv_decode not in ADV_DECODES:
            raise ValueError(f"unknown adv_decode {adv_decode!r}; use one of {ADV_DECODES}")
        if grad_checkpointing not in POLICIES:
            raise ValueError(f"unknown grad_checkpointing {grad_checkpointing!r}; use one of {POLICIES}")
        self.model = model
        # eq. 10's decode: at full size, or at the classifier's input size (an attribute: one
        # sampler per UNet, since each installs its own attention recorder on it)
        self.adv_decode: AdvDecode = adv_decode
        # eq. 11's backward: re-run the forward to save graph memory (checkpointing.py), per batch
        self.grad_checkpointing: Policy = grad_checkpointing
        self.prompt_cache_size = max(1, prompt_cache_size)  # embeddings kept, least recently used out
        pipe = model.pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        self.tiny_vae = model.tiny_vae  # eq. 10's surrogate decoder (adv_decoder "tiny"); None: none
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.device, self.dtype = model.device, model.dtype
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.model_defaults: ModelDefaults | None = model.defaults  # what its folder says (presets)
        self.recorder = install_recorder(self.unet)
        # the benchmark's part timings (part_timer.py); None: no marks, nothing recorded
        self.timer: PartTimer | None = None
        self.loss_scale = LossScale(self.dtype, self.device)  # float16: keeps eq. 11's gradient in range
        set_checkpointing((self.unet, self.vae), grad_checkpointing == "on")
        # per (template, class name), i.e. per full prompt and where the class sits in it: its
        # embeddings and class-token weights (None for the empty prompt)
        self._prompts: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        # for diagnostics: the last call's class-token attention summed over its steps, (batch, h, w)
        # at the mask resolution (eq. 8's m before normalising and upsampling); None unless aig/actgen
        self.last_attention: torch.Tensor | None = None

    @property
    def native_size(self) -> int:
        return int(self.model.native_size)

    def resolve(self, options: GenerationOptions) -> ResolvedOptions:
        """The options the request left to the preset or this model's defaults (docs/architecture.md 3)."""
        return resolve_options(options, self.model_defaults)

    def latent_shape(self, options: GenerationOptions) -> tuple[int, int, int]:
        return latent_shape(
            options, self.native_size, int(self.unet.config.in_channels), self.vae_scale_factor
        )

    # ------------------------------------------------------------------ the step loop
    def __call__(
        self,
        items: list[SampleItem],
        options: GenerationOptions,
        classifier: Classifier | None = None,
        on_step: Callable[[int, int], bool] | None = None,
    ) -> list[SampleOutput]:
        """Generate one image per item; raises :class:`Cancelled` when ``on_step`` returns False."""
        # 1. Check inputs
        if not items:
            return []
        if self.timer is not None:
            self.timer.begin()
        opts, mode = options, options.mode
        res = self.resolve(opts)  # the preset-dependent values: explicit > preset > model file > released
        if mode is Mode.actgen and opts.adv_prob > 0 and classifier is None:
            raise ValueError("a classifier is needed when options.adv_prob > 0 in actgen mode")
        if mode is Mode.actgen and opts.adv_prob > 0 and res.adv_decoder == "tiny" and self.tiny_vae is None:
            raise ValueError(
                f"options.adv_decoder 'tiny' (preset {res.defaults!r}) needs the model's tiny decoder, and "
                f"{self.model.model_id} has none (a {TINY_VAE_DIR}/ folder beside its components; "
                "fetch-model puts TAESD there for SD 2.1): use adv_decoder 'vae'"
            )
        height = opts.height or self.model.native_size
        width = opts.width or self.model.native_size
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (self.unet.config.in_channels, *latent_hw)
        guided, masked = mode is not Mode.random, mode in (Mode.aig, Mode.actgen)

        # 2. Timesteps, on the host (the UNet gets a device copy): no step waits on the device for them
        scheduler = DDPMScheduler.from_config(self.model.pipe.scheduler.config)
        scheduler.set_timesteps(opts.num_inference_steps)
        steps = [int(t) for t in scheduler.timesteps.tolist()]
        if max(steps) >= len(scheduler.alphas_cumprod):
            raise ValueError(
                f"options.num_inference_steps={opts.num_inference_steps} is more than this model's "
                f"scheduler supports ({scheduler.config.num_train_timesteps} training timesteps)"
            )
        posts = [PosteriorStep.at(scheduler, t) for t in steps]
        timesteps = scheduler.timesteps.to(self.device)
        total = len(steps)

        # 3. Each item's noise and decisions, from its own seed, all drawn now
        draws = [self._draw(item, opts) for item in items]
        noise = [d.noise for d in draws]
        x = self._randn(noise, shape)  # sample chain x_T
        x_guide = self._randn(noise, shape)  # guide chain x^g_T
        guide_eps = self._randn(noise, shape)  # drawn in every mode: a seed's noise is mode-independent
        step_noise = self._step_noise(noise, shape, total)  # (steps, B, C, h, w): z of each step

        # 4. Prompts, guide latents, and what gradient guidance pushes against
        uncond, cond, token_weights = self._encode_prompts(items, res.prompt)
        guide = self._encode_guides(items, guide_eps, height, width, opts.guide_fit) if guided else None
        plan = self._gradient_plan(items, draws, opts, classifier, shape, res.adv_decoder)
        strength = torch.tensor([d.strength for d in draws], device=self.device)
        guide_on = torch.tensor([guided and not d.plain for d in draws], device=self.device)
        grad_steps = min(opts.grad_steps, total) if plan is not None else 0
        history = GradHistory.empty(grad_steps, len(plan.row_list) if plan else 0, self.device)
        self._checkpoint_for(plan, res, latent_hw)
        self.loss_scale.begin_batch()

        self._mark("prepare")  # timesteps, noise, prompts, guide latents, the gradient plan

        # 5. Denoising loop
        attention = None  # class-token attention accumulated over steps (eq. 8's m before scaling)
        try:
            for k, post in enumerate(posts):
                t = timesteps[k]
                rows = plan.rows if plan is not None and k < grad_steps else None
                if masked:
                    self.recorder.begin_step(len(items), latent_hw, self.device)
                # one UNet batch for [x, x] x [uncond, c]; a graph only through the embeddings moved
                noise_pred = self.predict_noise(
                    x,
                    t,
                    uncond,
                    cond,
                    token_weights,
                    rows,
                    res.update_uncond,
                    keep=plan.keep if plan is not None else None,
                )
                self._mark("unet_forward" if rows is None else "guided_unet_forward")
                eps = cfg_noise(noise_pred.uncond, noise_pred.cond, res.guidance_scale)  # eq. 4
                x0 = post.predict_x0(x, eps)  # x0_hat
                if plan is not None and rows is not None:  # gradient guidance, eq. 9-11
                    loss = self.guidance_loss(x0[rows], plan.targets(x0))
                    leaves = noise_pred.leaves
                    scale = self.loss_scale.value if self.loss_scale.enabled else 1.0
                    grads = scaled_gradients(loss.total.sum(), leaves, scale)
                    finite, zero = gradient_health(grads)  # a non-finite gradient: no move this step
                    self.loss_scale.update(finite)
                    # eq. 11: the moved embeddings carry over to every later step
                    cond = cond.index_copy(0, rows, self._moved(leaves[0], grads[0], finite, res))
                    if len(leaves) > 1:  # the released code moves [uncond, c] together
                        uncond = uncond.index_copy(0, rows, self._moved(leaves[1], grads[1], finite, res))
                    x0 = x0.detach()
                    history.add(k, loss, finite, zero)
                    self._mark("guidance_loss_and_backward")  # eq. 9-10 (decode, classifier), eq. 11
                z = step_noise[k]  # the same z for both chains
                x_prev = post.step(x0, x, z)  # eq. 5
                if guide is not None:  # guided (ig, aig, actgen)
                    x_guide = post.step(guide, x_guide, z)  # eq. 6: x0 := guide latent
                    m: torch.Tensor | float = 1.0  # ig: no mask
                    if masked:
                        step_maps = self.recorder.step_maps()
                        if attention is None:  # the released code's sum starts from ones
                            attention = (
                                torch.zeros_like(step_maps)
                                if res.normalize_mask
                                else torch.ones_like(step_maps)
                            )
                        attention = attention + step_maps
                        m = upsample_mask(
                            normalize_mask(attention) if res.normalize_mask else attention, latent_hw
                        )
                    gamma_k = gamma(k, strength) * guide_on  # eq. 7; plain items: 0
                    x_prev = image_guidance(x_prev, x_guide, gamma_k, m)  # eq. 8
                x = x_prev
                self._mark("step_rest")  # eq. 5-8: the posterior step, the guide chain, the mask
                if on_step is not None and on_step(k + 1, total) is False:
                    raise Cancelled(f"cancelled after step {k + 1} of {total}")
        finally:  # whatever stopped the loop, the recorder must not go on recording the next batch
            self.recorder.reset()

        # 6. Decode
        self.last_attention = attention
        images = self._decode(x, opts.output_size)
        latents = x.detach().float().cpu()
        self._mark("decode")
        rows_of = plan.row_list if plan is not None else []
        adversarial = plan.adv_list if plan is not None else []
        grad_records, zero_steps, nonfinite_steps = history.per_item(len(items), rows_of, adversarial)
        outputs = [
            SampleOutput(
                image=images[i],
                latent=latents[i],
                record=item_record(
                    index=i,
                    class_id=item.class_id,
                    class_name=item.class_name,
                    guide_id=item.guide_id,
                    seed=item.seed,
                    options=opts,
                    draw=draws[i].decided,
                    native_size=self.native_size,
                    resolved=res,
                    grad_records=grad_records[i],
                    zero_grad_steps=zero_steps[i],
                    nonfinite_grad_steps=nonfinite_steps[i],
                ),
            )
            for i, item in enumerate(items)
        ]
        self._mark("records")  # each item's provenance (the gradient history's one copy to the host)
        return outputs

    def _mark(self, part: str) -> None:
        if self.timer is not None:
            self.timer.mark(part)

    def _moved(
        self, leaf: torch.Tensor, grad: torch.Tensor, finite: torch.Tensor, res: ResolvedOptions
    ) -> torch.Tensor:
        """Eq. 11 for each guided item whose gradient is finite; the others stay where they are."""
        moved = normalized_update(leaf.detach(), grad, res.lr, res.grad_norm)
        return torch.where(finite.view(-1, *([1] * (leaf.dim() - 1))), moved, leaf.detach())

    def _checkpoint_for(
        self, plan: GradientPlan | None, res: ResolvedOptions, latent_hw: tuple[int, int]
    ) -> None:
        """Gradient checkpointing on for this batch when its policy says so (checkpointing.py)."""
        need = 0
        if plan is not None and self.grad_checkpointing == "auto" and self.device.type == "cuda":
            unet_rows = len(plan.row_list) * (2 if res.update_uncond else 1)
            need = unet_rows * unet_graph_elements(self.unet.config, latent_hw)
            adversarial = sum(plan.adv_list)
            # the tiny decoder's graph is ~1/20 of the VAE's (TAESD: 64 channels throughout): not counted
            if adversarial and plan.classifier is not None and plan.decoder == "vae":
                side = latent_hw
                if self.adv_decode == "classifier":
                    small = math.ceil(plan.classifier.input_size / self.vae_scale_factor)
                    side = (min(small, latent_hw[0]), min(small, latent_hw[1]))
                need += adversarial * vae_decode_graph_elements(self.vae.config, side)
            need *= torch.finfo(self.dtype).bits // 8
        on = plan is not None and wants_checkpointing(self.grad_checkpointing, self.device, need)
        set_checkpointing((self.unet, self.vae), on)

    # ------------------------------------------------------------------ pieces of a step
    def predict_noise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        uncond: torch.Tensor,
        cond: torch.Tensor,
        token_weights: torch.Tensor,
        grad_rows: torch.Tensor | None = None,
        update_uncond: bool = False,
        keep: torch.Tensor | None = None,
    ) -> NoisePrediction:
        """eps(x, 0) and eps(x, c) for every item, and the embedding leaves the graph starts from.

        Without ``grad_rows``: one UNet call on the 2B-row CFG batch, no graph. With them, those
        items' conditional rows (and unconditional ones with ``update_uncond``) run in a call that
        keeps a graph and every other row in one without, so backward traverses only what eq. 11
        moves. ``keep``: the other rows, when the caller knows them (saves a device sync a step).
        """
        n = x.shape[0]
        everyone = torch.arange(n, device=self.device)
        if grad_rows is None:
            with torch.no_grad():
                eps_u, eps_c = self._cfg_rows(x, t, uncond, cond, token_weights, everyone, everyone)
            return NoisePrediction(eps_u, eps_c, ())
        if keep is None:
            keep = everyone[~torch.isin(everyone, grad_rows)]
        u_rest = keep if update_uncond else everyone
        u_grad = grad_rows if update_uncond else grad_rows[:0]
        with torch.no_grad():
            rest_u, rest_c = self._cfg_rows(x, t, uncond, cond, token_weights, u_rest, keep)
        c_leaf = cond[grad_rows].detach().requires_grad_(True)
        u_leaf = uncond[grad_rows].detach().requires_grad_(True) if update_uncond else None
        with torch.enable_grad():
            cond_g = cond.index_copy(0, grad_rows, c_leaf)
            uncond_g = uncond.index_copy(0, grad_rows, u_leaf) if u_leaf is not None else uncond
            grad_u, grad_c = self._cfg_rows(x, t, uncond_g, cond_g, token_weights, u_grad, grad_rows)
            eps_u = rest_u.new_zeros(x.shape).index_copy(0, u_rest, rest_u).index_copy(0, u_grad, grad_u)
            eps_c = rest_c.new_zeros(x.shape).index_copy(0, keep, rest_c).index_copy(0, grad_rows, grad_c)
        leaves = (c_leaf,) if u_leaf is None else (c_leaf, u_leaf)
        return NoisePrediction(eps_u, eps_c, leaves)

    def _cfg_rows(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        uncond: torch.Tensor,
        cond: torch.Tensor,
        token_weights: torch.Tensor,
        u_items: torch.Tensor,
        c_items: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """eps of the unconditional rows of ``u_items`` and the conditional rows of ``c_items``, one call."""
        nu = len(u_items)
        if nu + len(c_items) == 0:  # every row of this kind runs in the other call
            empty = x.new_zeros((0, *x.shape[1:]))
            return empty, empty
        sample = torch.cat([x[u_items], x[c_items]])
        embeds = torch.cat([uncond[u_items], cond[c_items]])
        # the class token is in c: the call's last rows are the ones recorded (attention.ClassTokenRecord)
        eps = self._unet(sample, t, embeds, c_items, token_weights[c_items])
        return eps[:nu], eps[nu:]

    def _unet(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        record_items: torch.Tensor,
        token_weights: torch.Tensor,
    ) -> torch.Tensor:
        """One UNet call; while a step records, the class-token maps of its last ``len(record_items)``
        rows come back in a tensor the recording layers fill (no Python state inside the graph)."""
        record = self.recorder.record(token_weights)
        out = self.unet(
            sample.to(self.dtype),
            t,
            encoder_hidden_states=embeds.to(self.dtype),
            cross_attention_kwargs=None if record is None else {RECORD_KWARG: record},
            return_dict=False,
        )[0]
        if record is not None:
            self.recorder.collect(record_items, record)
        return out.float()

    def guidance_loss(self, x0: torch.Tensor, targets: GradientTargets) -> GuidanceLoss:
        """L = L_contra + lambda L_adv for the gradient-guided items (eq. 9, 10)."""
        contra = contrastive_loss(x0, targets.bank, targets.valid, targets.margin)  # eq. 9
        adv = torch.zeros_like(contra)
        prediction = torch.full_like(contra, -1, dtype=torch.long)
        adv_rows = targets.adv_rows
        if len(adv_rows):  # the classifier runs only for adversarial items
            clf = targets.classifier
            assert clf is not None
            decoded = self.adv_decode_image(x0[adv_rows], clf.input_size, targets.decoder)
            param = next(clf.module.parameters(), None)
            inputs = classifier_input(decoded, clf.input_size, clf.mean, clf.std)
            logits = clf.module(inputs.to(param.dtype if param is not None else torch.float32))
            adv = adv.index_copy(0, adv_rows, adversarial_loss(logits, targets.class_ids[adv_rows]))  # eq. 10
            prediction = prediction.index_copy(0, adv_rows, logits.argmax(1))
        return GuidanceLoss(
            total=contra + targets.adv_weight * adv, contra=contra, adv=adv, prediction=prediction
        )

    def adv_decode_image(
        self, x0: torch.Tensor, input_size: int, decoder: AdvDecoder = "vae"
    ) -> torch.Tensor:
        """Eq. 10's D(x0_hat) in [-1, 1], through the VAE or the tiny surrogate decoder (differentiable)."""
        latents = self.adv_latents(x0, input_size, decoder)
        if decoder == "tiny":
            assert self.tiny_vae is not None
            return self.tiny_vae.decode(latents, return_dict=False)[0]
        return self.vae.decode(latents, return_dict=False)[0]

    def adv_latents(self, x0: torch.Tensor, input_size: int, decoder: AdvDecoder = "vae") -> torch.Tensor:
        """What eq. 10's decode gets: x0_hat unscaled, at the classifier's size with adv_decode "classifier".

        Each decoder reads latents divided by its own ``scaling_factor``: the SD VAE's 0.18215, TAESD's
        1.0 (it decodes the sampler's scaled latents as they are), a distilled tiny decoder's 1.0.
        The classifier sees the image resized to ``input_size`` anyway; decoding a latent of
        ``ceil(input_size / vae scale)`` instead of the full one cuts the decode and its backward by
        about (full / input)^2, at the cost of an approximation (measured by ``make bench``).
        """
        scale = self.scaling_factor
        if decoder == "tiny":
            assert self.tiny_vae is not None
            scale = float(self.tiny_vae.config["scaling_factor"])
        latents = x0 / scale
        if self.adv_decode == "classifier":
            latents = classifier_size_latents(latents, input_size, self.vae_scale_factor)
        return latents.to(self.dtype)

    # ------------------------------------------------------------------ per-job preparation
    def _draw(self, item: SampleItem, opts: GenerationOptions) -> _Draw:
        noise = torch.Generator().manual_seed(item.seed)
        decisions = decision_stream(item.seed)
        return _Draw(noise, decisions, draw_decisions(decisions, item.confidence, opts))

    def _randn(self, generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """One standard-normal draw per item from its own (CPU) generator: batch-independent."""
        draws = [torch.randn(shape, generator=g) for g in generators]
        return torch.stack(draws).to(self.device)

    def _step_noise(
        self, generators: list[torch.Generator], shape: tuple[int, ...], steps: int
    ) -> torch.Tensor:
        """Every step's z at once, (steps, B, *shape): item i's generator read in step order, as a
        draw per step would (the same values), into one (pinned, on CUDA) tensor copied once."""
        pinned = self.device.type == "cuda"
        z = torch.empty((steps, len(generators), *shape), pin_memory=pinned)
        for i, g in enumerate(generators):
            for k in range(steps):
                torch.randn(shape, generator=g, out=z[k, i])
        return z.to(self.device, non_blocking=pinned)

    @torch.no_grad()
    def _encode_prompts(
        self, items: list[SampleItem], template: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Empty-prompt and ``template`` (options.prompt, one ``{}``; None: this model's default)
        embeddings per item (float32), and the class-token weights."""
        template = template or self.resolve(GenerationOptions()).prompt
        batch: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # the empty prompt, then the classes in item order: a set's order follows the string hash,
        # which made what the LRU evicts differ from one process to the next
        for name in ["", *dict.fromkeys(item.class_name for item in items)]:
            key = (template, name) if name else ("", "")
            entry = self._prompts.get(key)
            if entry is None:
                prompt = prompt_text(template, name) if name else ""
                embeds, _ = self.model.pipe.encode_prompt(prompt, self.device, 1, False)
                weights = class_token_weights(self.tokenizer, name, template) if name else None
                entry = (embeds[0].float(), weights)
            batch[name] = self._prompts[key] = entry
            self._prompts.move_to_end(key)
        while len(self._prompts) > self.prompt_cache_size:  # bounded: one entry per prompt seen
            self._prompts.popitem(last=False)
        cond = torch.stack([batch[item.class_name][0] for item in items])
        item_weights: list[torch.Tensor] = []
        for item in items:
            class_weights = batch[item.class_name][1]
            if class_weights is None:  # only the empty name has none: it has no class token
                raise ValueError(f"class name {item.class_name!r} is not found whole in its tokenised prompt")
            item_weights.append(class_weights)
        weights = torch.stack(item_weights).to(self.device)
        uncond = batch[""][0].expand_as(cond)
        return uncond, cond, weights

    @torch.no_grad()
    def _encode_guides(
        self, items: list[SampleItem], eps: torch.Tensor, height: int, width: int, fit: GuideFit = "crop"
    ) -> torch.Tensor:
        """Guide images -> VAE latents (a posterior sample, scaled), fit to the generation size."""
        pixels = []
        for k, item in enumerate(items):
            guide = np.asarray(item.guide)
            if guide.dtype != np.uint8 or guide.ndim != 3 or guide.shape[2] != 3:
                raise ValueError(
                    f"items[{k}].guide must be a uint8 HxWx3 array, got {guide.dtype} {guide.shape}"
                )
            img = torch.from_numpy(np.ascontiguousarray(guide)).permute(2, 0, 1)[None].float() / 255.0
            pixels.append(fit_guide(img, height, width, fit)[0])  # crop, pad or stretch
        batch = (torch.stack(pixels) * 2 - 1).to(self.device, self.dtype)
        dist = self.vae.encode(batch).latent_dist
        return (dist.mean.float() + dist.std.float() * eps) * self.scaling_factor

    def _gradient_plan(
        self,
        items: list[SampleItem],
        draws: list[_Draw],
        opts: GenerationOptions,
        classifier: Classifier | None,
        shape: tuple[int, ...],
        decoder: AdvDecoder = "vae",
    ) -> GradientPlan | None:
        """Which items get gradient guidance, their stored bank and their same-job peers (eq. 9, 10)."""
        if opts.mode is not Mode.actgen or opts.grad_steps == 0:
            return None
        contrastive = opts.bank_sample > 0
        rows: list[int] = []
        stored: list[torch.Tensor | None] = []
        peers: list[torch.Tensor] = []
        for i, (item, draw) in enumerate(zip(items, draws, strict=True)):
            if draw.plain:
                continue
            bank = item.bank if contrastive and item.bank is not None and len(item.bank) else None
            if bank is not None and tuple(bank.shape[1:]) != shape:
                raise ValueError(
                    f"memory bank of class {item.class_id} holds latents of shape "
                    f"{tuple(bank.shape[1:])}, this job generates {shape}"
                )
            mates = [
                j
                for j, (other, d) in enumerate(zip(items, draws, strict=True))
                if contrastive
                and j != i
                and not d.plain
                and item.bank_group is not None
                and other.bank_group == item.bank_group
                and other.class_id == item.class_id
            ]
            if bank is None and not mates and not draw.adversarial:
                continue  # L = 0: no graph needed
            rows.append(i)
            stored.append(None if bank is None else bank.flatten(1).to(self.device, torch.float32))
            peers.append(torch.tensor(mates, dtype=torch.long, device=self.device))
        if not rows:
            return None
        adv_list = [draws[i].adversarial for i in rows]
        if any(adv_list) and classifier is not None:
            classifier.module.to(self.device).eval()
        others = [i for i in range(len(items)) if i not in set(rows)]
        return GradientPlan.build(
            stored,
            peers,
            dim=int(np.prod(shape)),
            bank_sample=opts.bank_sample,
            device=self.device,
            rows=torch.tensor(rows, device=self.device),
            keep=torch.tensor(others, dtype=torch.long, device=self.device),
            row_list=rows,
            adv_list=adv_list,
            adv_rows=torch.tensor(
                [r for r, adv in enumerate(adv_list) if adv], dtype=torch.long, device=self.device
            ),
            class_ids=torch.tensor([items[i].class_id for i in rows], device=self.device),
            adversarial=torch.tensor(adv_list, device=self.device),
            draws=[draws[i].decisions for i in rows],
            margin=self.resolve(opts).contrastive_margin,
            adv_weight=opts.adv_weight,
            classifier=classifier,
            decoder=decoder,
        )

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, output_size: int | None) -> list[np.ndarray]:
        images = self.vae.decode((latents / self.scaling_factor).to(self.dtype), return_dict=False)[0].float()
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_size is not None and images.shape[-2:] != (output_size, output_size):
            images = F.interpolate(
                images, size=(output_size, output_size), mode="bilinear", align_corners=False, antialias=True
            )
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return list(pixels)
