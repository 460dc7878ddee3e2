"""What a criterion is: what every criterion has, and what some offer. The one place to read before writing one.

Every criterion (one dataclass in ``raysal/criteria/<name>.py``, one ``configs/criterion/<name>.yaml`` with its
``_target_``) is a `Criterion`:

- ``name``: its key, logged as ``train/loss/<name>``; unique within a run;
- ``weight``: its factor in ``total = Σ_c weight_c · L_c``;
- ``needs``: what the step must hand it, a subset of `raysal.criteria.inputs.NEEDS` (``logits``,
  ``image_attention``, ``attentions``, ``model``); `raysal.loop.step.validate_criteria` refuses anything else;
- ``replaces_lm``: True only for a language term that stands in for ``lm`` (``cal``): the run then has no ``lm``;
- ``__call__(inputs: CriterionInputs) -> Tensor``: a scalar with gradients.

Some criteria offer more. The protocols below are runtime-checkable: an object offers a capability when it has its
attributes, and the step, the loop, the worker and the checks ask with ``isinstance``:

- `LayerSelection` (``layers``, ``query_offset``): a criterion that reads attention maps of chosen layers at the
  query rows of the grounded tokens (0: the token's own row; −1: the row that predicts it). Required of every
  criterion that needs ``attentions`` (``seed_kl``). The attention criteria of one run share one ``query_offset``.
- `AttentionSelection` (a `LayerSelection` with ``heads`` and ``top_k``): the layers × heads the capture keeps for
  it. Required of every criterion that needs ``image_attention`` (``kl``, ``mse``, ``mass``, ``bce_dice``): the
  capture is planned from the union of their selections. ``heads: localization`` is replaced, before the run
  starts, by the ``top_k`` best (layer, head) pairs of the head finder's table.
- `AttachesModules` (``attach(model)``): modules the criterion trains (``maskembed``'s decoder), added to the HF
  model once, before it is wrapped for several workers, so they train, synchronise and checkpoint with it.
- `HooksForward` (``during_forward()``): a context the step opens around the forward and the criteria, for work
  that runs inside the model's forward (``maskembed``'s hook on the projector).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import ClassVar, Protocol, runtime_checkable

import torch

from raysal.criteria.inputs import CriterionInputs


@runtime_checkable
class Criterion(Protocol):
    """What every criterion has (module docstring)."""

    name: str
    weight: float
    needs: ClassVar[frozenset[str]]
    replaces_lm: ClassVar[bool]

    def __call__(self, inputs: CriterionInputs, /) -> torch.Tensor: ...


@runtime_checkable
class LayerSelection(Protocol):
    """Reads attention of chosen layers (``early`` / ``middle`` / ``late`` / ``all`` / a list) at the grounded
    tokens' query rows (``query_offset`` 0 or −1)."""

    layers: str | list[int]
    query_offset: int


@runtime_checkable
class AttentionSelection(LayerSelection, Protocol):
    """Reads the captured image attention of chosen layers × heads (``all``, a list, (layer, head) pairs, or
    ``localization``: the ``top_k`` best pairs of the head finder's table)."""

    heads: str | list
    top_k: int


@runtime_checkable
class AttachesModules(Protocol):
    """Trains modules of its own, attached to the (unwrapped) model once before DDP / FSDP wraps it."""

    def attach(self, model: torch.nn.Module) -> None: ...


@runtime_checkable
class HooksForward(Protocol):
    """Works inside the model's forward: the step opens ``during_forward()`` around the forward and the criteria."""

    def during_forward(self) -> AbstractContextManager[None]: ...


ATTENTION_NEEDS = frozenset({"image_attention", "attentions"})  # needs that make a criterion read attention


def reads_attention(criterion: Criterion) -> bool:
    """True for a criterion that reads attention maps (captured or eager): grounding targets are built for it."""
    return bool(criterion.needs & ATTENTION_NEEDS)


def missing_selection(criterion: Criterion) -> str | None:
    """What ``criterion`` lacks for the attention it needs, or None: ``image_attention`` asks for an
    `AttentionSelection`, ``attentions`` for a `LayerSelection`."""
    if "image_attention" in criterion.needs and not isinstance(criterion, AttentionSelection):
        return "needs image_attention, so it must have layers, heads, top_k and query_offset"
    if "attentions" in criterion.needs and not isinstance(criterion, LayerSelection):
        return "needs attentions, so it must have layers and query_offset"
    return None
