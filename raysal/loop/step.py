"""One forward + backward with every criterion: ``total = Σ_c weight_c · L_c`` (``lm`` is a criterion too).

The capture context stays open through ``backward`` so that gradient checkpointing, which re-runs layer forwards
during backward, captures the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raysal.attention.capture import AttentionCapture, CapturePlan, image_attention_from_maps
from raysal.attention.selection import resolve_selection
from raysal.attention.targets import grounding_targets
from raysal.batch import model_inputs
from raysal.criteria.inputs import NEEDS, CriterionInputs
from raysal.criteria.protocol import (
    AttentionSelection,
    Criterion,
    HooksForward,
    LayerSelection,
    missing_selection,
    reads_attention,
)
from raysal.distributed import all_reduce_sum, world_size
from raysal.loop.divergence import DivergedError
from raysal.model.build import ModelInfo


class NonFiniteLossError(DivergedError, FloatingPointError):
    pass


@dataclass(frozen=True)
class StepPlan:
    """What the step needs to know about a run's criteria and model, resolved once at set-up (`plan_step`)."""

    capture: CapturePlan | None  # layers × heads the attention criteria read; None: no criterion reads them
    query_offset: int  # 0 / −1: the query rows judged, shared by every attention criterion of the run
    eager: bool  # a criterion needs the full (B, H, L, L) maps: eager attention; the capture's input is cut from them
    grounded: bool  # a criterion needs grounding targets
    needs_model: bool  # a criterion runs its own forward (`cal`)
    n_layers: int  # language-model layers
    n_heads: int  # query heads per layer


def plan_step(criteria: Sequence[Criterion], info: ModelInfo) -> StepPlan:
    """Check the criteria (`validate_criteria`) and resolve what every step of the run will do."""
    validate_criteria(criteria)
    capture = capture_plan(criteria, info)
    offset = next((c.query_offset for c in attention_criteria(criteria)), 0)  # one for all (`validate_criteria`)
    if capture is not None:
        offset = capture.query_offset
    return StepPlan(
        capture=capture,
        query_offset=offset,
        eager=needs_eager(criteria),
        grounded=any(reads_attention(c) for c in criteria),
        needs_model=any("model" in c.needs for c in criteria),
        n_layers=info.n_layers,
        n_heads=info.n_heads,
    )


def validate_criteria(criteria: Sequence[Criterion]) -> None:
    """Fail at set-up, with the reason, on a combination the step cannot run (`raysal.criteria.protocol`: what a
    criterion has and offers)."""
    if not criteria:
        raise ValueError("no criterion configured (use at least `lm`)")
    names = [c.name for c in criteria]
    if len(set(names)) != len(names):
        raise ValueError(f"criterion names must be unique, got {names}")
    for c in criteria:
        unknown = set(c.needs) - NEEDS
        if unknown:
            raise ValueError(f"criterion {c.name!r} needs {sorted(unknown)}; the step supplies {sorted(NEEDS)}")
        missing = missing_selection(c)
        if missing:
            raise ValueError(f"criterion {c.name!r} {missing}")
    if sum(c.replaces_lm for c in criteria) and "lm" in names:
        raise ValueError(f"{[c.name for c in criteria if c.replaces_lm]} replace the LM loss: drop `lm` from the run")
    offsets = {c.query_offset for c in attention_criteria(criteria)}
    if len(offsets) > 1:
        raise ValueError(f"attention criteria of one run must share query_offset, got {sorted(offsets)}")


def attention_criteria(criteria: Sequence[Criterion]) -> list[LayerSelection]:
    """The criteria that read attention maps, each a `LayerSelection` (`validate_criteria` refuses one that is
    not)."""
    return [c for c in criteria if reads_attention(c) and isinstance(c, LayerSelection)]


def capture_plan(criteria: Sequence[Criterion], info: ModelInfo) -> CapturePlan | None:
    """The union of the attention criteria's layers × heads, or None when no criterion needs image attention."""
    attn = [c for c in criteria if "image_attention" in c.needs and isinstance(c, AttentionSelection)]
    if not attn:
        return None
    pairs = {p for c in attn for p in resolve_selection(c.layers, c.heads, info.n_layers, info.n_heads)}
    layers, heads = sorted({ly for ly, _ in pairs}), sorted({hd for _, hd in pairs})  # the grid holding them all
    return CapturePlan(tuple(layers), tuple(heads), attn[0].query_offset)


def needs_eager(criteria: Sequence[Criterion]) -> bool:
    return any("attentions" in c.needs for c in criteria)


def train_step(
    model: torch.nn.Module,
    batch: dict,
    criteria: Sequence[Criterion],
    plan: StepPlan,
    *,
    step: int,
    loss_scale: float = 1.0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Forward, every criterion, backward of ``loss_scale · total``. Returns the unscaled values as floats.

    ``batch`` is a device batch (`raysal.batch.to_device`); ``plan`` comes from `plan_step` on the same criteria.
    """
    targets = grounding_targets(batch, plan.query_offset) if plan.grounded else None
    cp = plan.capture
    with contextlib.ExitStack() as stack:
        cap = None
        if cp is not None and not plan.eager:
            assert targets is not None
            cap = stack.enter_context(AttentionCapture(cp.layers, cp.heads, targets.query_pos, targets.key_pos))
        for c in criteria:  # a criterion whose work runs inside the forward (maskembed's decoder)
            if isinstance(c, HooksForward):
                stack.enter_context(c.during_forward())
        with autocast or contextlib.nullcontext():
            out = model(**model_inputs(batch), output_attentions=plan.eager, use_cache=False)
        image_attention = None
        if cap is not None:
            image_attention = cap.stacked()
        elif cp is not None:  # eager maps exist anyway (a seed-style criterion): cut the capture's input from them
            assert targets is not None
            image_attention = image_attention_from_maps(
                out.attentions, cp.layers, cp.heads, targets.query_pos, targets.key_pos
            )
        inputs = CriterionInputs(
            batch=batch,
            logits=out.logits,
            targets=targets,
            n_layers=plan.n_layers,
            n_heads=plan.n_heads,
            image_attention=image_attention,
            captured_layers=cp.layers if cp else (),
            captured_heads=cp.heads if cp else (),
            attentions=out.attentions if plan.eager else None,
            model=model if plan.needs_model else None,
        )
        terms = {c.name: c(inputs) for c in criteria}
        total = sum(c.weight * terms[c.name] for c in criteria)
        bad = next(((f"loss term {n!r}", v.item()) for n, v in terms.items() if not torch.isfinite(v)), None)
        if bad is None and not torch.isfinite(total):
            bad = ("total loss", total.item())
        # several ranks: decided together, before backward (its collectives would wait for a rank that stopped)
        if world_size() > 1 and all_reduce_sum([bad is not None], out.logits.device)[0] and bad is None:
            raise NonFiniteLossError(f"step {step}: another rank's loss is not finite; stopping with it")
        if bad is not None:
            raise NonFiniteLossError(f"step {step}: {bad[0]} is {bad[1]} (not finite); stopping")
        (total * loss_scale).backward()
    metrics = {"loss": float(total.detach())}
    metrics.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
    if targets is not None:
        metrics["grounded_tokens"] = float(targets.token_valid.sum())
        metrics["invisible_tokens"] = float(targets.n_invisible)
    return metrics
