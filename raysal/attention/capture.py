"""Memory-efficient attention capture (DESIGN §3.3).

``output_attentions=True`` forces eager attention and keeps every layer's (B, heads, L, L) matrix. Instead we
register an attention function with transformers' ``AttentionInterface`` that

* computes the layer output with SDPA, exactly as the stock ``sdpa`` implementation, and
* only in the selected layers, for the selected query heads and only at the requested query rows, computes the
  exact softmax over all keys (fp32, causal + padding mask, GQA key heads repeated per query head) and keeps the
  image-key columns: (B, heads_sel, T, I) per layer. Gradients flow through q and k.

Use::

    enable_capture(model)                       # once: switches the language model to this implementation
    with AttentionCapture(layers, heads, query_pos, key_pos) as cap:
        out = model(**batch)
        probs = cap.stacked()                   # (B, n_layers_sel, n_heads_sel, T, I)
        loss = ...; loss.backward()             # keep the context open through backward (gradient checkpointing
                                                # re-runs the layer forward, which must capture the same way)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

CAPTURE_IMPL = "raysal_capture"


@dataclass(frozen=True)
class CapturePlan:
    """Which layers × heads are captured, at which query rows (offset 0: the token; −1: the row predicting it).
    The training criteria's plan and the evaluation protocol's are both one of these."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    query_offset: int = 0


@dataclass
class _Request:
    layers: frozenset[int]
    heads: torch.Tensor  # (h,) long query-head indices
    query_pos: torch.Tensor  # (B, T) long: sequence positions of the query rows
    key_pos: torch.Tensor  # (B, I) long: sequence positions of the image tokens
    out: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → (B, h, T, I)
    reduce: bool = False  # keep only the running sum over layers × heads (evaluation: (B, T, I), not ℓ × h maps)
    total: torch.Tensor | None = None  # (B, T, I) fp32 when reducing
    seen: set[int] = field(default_factory=set)  # layers that ran (reducing)


_ACTIVE: ContextVar[_Request | None] = ContextVar("raysal_attention_capture", default=None)


def _allowed_keys(attention_mask: torch.Tensor | None, query_pos: torch.Tensor, n_keys: int) -> tuple:
    """(B, T, L) bool of keys each captured row may attend to, or an additive float mask; from whatever mask
    transformers built: None (pure causal, no padding), bool (B|1, 1, Q, K) with True = attend, or float additive."""
    B, T = query_pos.shape
    if attention_mask is None:
        keys = torch.arange(n_keys, device=query_pos.device)
        return keys[None, None, :] <= query_pos[:, :, None], None  # (B, T, L)
    mask = attention_mask[:, 0, :, :n_keys].expand(B, -1, -1)  # (B, Q, L)
    rows = mask.gather(1, query_pos[:, :, None].expand(B, T, n_keys))  # (B, T, L)
    if rows.dtype == torch.bool:
        return rows, None
    return None, rows.float()


def _image_probs(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, mask, scaling, req: _Request):
    """Exact attention probabilities of the requested rows over image keys: (B, h, T, I)."""
    B, n_q_heads, L, D = query.shape
    groups = n_q_heads // key.shape[1]  # GQA: query head j reads key head j // groups
    heads = req.heads.to(query.device)
    T, I = req.query_pos.shape[1], req.key_pos.shape[1]
    # rows first, then heads: only (B, H, T, D) is ever copied, never (B, h, L, D)
    q = query.gather(2, req.query_pos[:, None, :, None].expand(B, n_q_heads, T, D))  # (B, H, T, D)
    scale = scaling if scaling is not None else D**-0.5
    if len(heads) == n_q_heads:  # every head: read each key head in place, its query heads stacked (no key copy)
        n_kv = key.shape[1]
        q = q.reshape(B, n_kv, groups * T, D)  # query head j = kv head j // groups, as repeat_kv orders them
        scores = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scale  # (B, kv, groups·T, L) fp32
        scores = scores.view(B, n_q_heads, T, L)  # (B, H, T, L)
    else:
        q = q[:, heads]  # (B, h, T, D)
        k = key[:, heads // groups]  # (B, h, L, D)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, h, T, L) fp32
    allowed, additive = _allowed_keys(mask, req.query_pos, L)
    if allowed is None:  # float additive mask: fully masked rows hold a large negative, not -inf
        allowed = additive > torch.finfo(torch.float32).min / 2
        scores = scores + additive[:, None]
    # a row with no allowed key (a padding position as query) would softmax to NaN and poison the backward pass:
    # let it see everything, then zero it
    has_key = allowed.any(-1, keepdim=True)  # (B, T, 1)
    scores = scores.masked_fill(~(allowed | ~has_key)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1) * has_key[:, None]  # (B, h, T, L)
    return probs.gather(-1, req.key_pos[:, None, None, :].expand(B, len(heads), T, I))  # (B, h, T, I)


def capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, heads, L, D)
    key: torch.Tensor,  # (B, kv_heads, L, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA for the output; the exact probabilities of the requested rows as a side product."""
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    req = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if req is not None and layer in req.layers:
        probs = _image_probs(module, query, key, attention_mask, scaling, req)  # (B, h, T, I)
        if req.reduce:
            part = probs.sum(1)  # (B, T, I): this layer's heads, added to the running sum and dropped
            req.total = part if req.total is None else req.total + part
            req.seen.add(layer)
        else:
            req.out[layer] = probs
    return out, None


AttentionInterface.register(CAPTURE_IMPL, capture_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPL, sdpa_mask)  # same masks as SDPA: None or bool (B, 1, Q, K)


def enable_capture(model: torch.nn.Module) -> None:
    """Route the language model's attention through `capture_attention_forward` (vision tower keeps its own)."""
    model.set_attn_implementation({"text_config": CAPTURE_IMPL})


@contextmanager
def no_capture() -> Iterator[None]:
    """Suspend an open capture for an extra forward whose maps nobody reads (``cal``'s image-blind forward)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def image_attention_from_maps(
    attentions: Sequence[torch.Tensor],  # per layer (B, H, L, L): eager ``output_attentions``
    layers: Sequence[int],
    heads: Sequence[int],
    query_pos: torch.Tensor,  # (B, T) long
    key_pos: torch.Tensor,  # (B, I) long
) -> torch.Tensor:
    """What `AttentionCapture.stacked` returns, cut from full eager maps: (B, ℓ, h, T, I) fp32.

    A run that already pays for eager maps (a seed-style criterion) gives the capture criteria their input from
    them instead of capturing a second time."""
    B, T = query_pos.shape
    I = key_pos.shape[1]
    out = []
    for layer in sorted(layers):
        att = attentions[layer][:, list(heads)].float()  # (B, h, L, L)
        h, L = att.shape[1], att.shape[-1]
        rows = att.gather(2, query_pos[:, None, :, None].expand(B, h, T, L))  # (B, h, T, L)
        out.append(rows.gather(3, key_pos[:, None, None, :].expand(B, h, T, I)))  # (B, h, T, I)
    return torch.stack(out, dim=1)


class AttentionCapture:
    """Context manager: capture for ``layers`` × ``heads`` at rows ``query_pos`` over keys ``key_pos``."""

    def __init__(
        self,
        layers: Sequence[int],
        heads: Sequence[int],
        query_pos: torch.Tensor,  # (B, T) long
        key_pos: torch.Tensor,  # (B, I) long
        *,
        reduce: bool = False,
    ) -> None:
        """``reduce=True`` (no-grad evaluation): keep only the mean over the layers × heads, (B, T, I), read with
        `mean()`; the per-layer maps, ℓ × h times larger, are never held together."""
        self.layers = tuple(sorted(layers))
        self.request = _Request(
            layers=frozenset(self.layers),
            heads=torch.as_tensor(list(heads), dtype=torch.long),
            query_pos=query_pos.long(),
            key_pos=key_pos.long(),
            reduce=reduce,
        )
        self._token = None

    def __enter__(self) -> AttentionCapture:
        if self.request.reduce and torch.is_grad_enabled():
            # a checkpointed layer re-runs its forward in backward and would be added twice; training captures
            # keep per-layer maps (their criteria may weigh layers)
            raise RuntimeError("AttentionCapture(reduce=True) is for no-grad evaluation (torch.no_grad())")
        self._token = _ACTIVE.set(self.request)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    def _check_ran(self, ran: set[int] | dict) -> None:
        missing = [i for i in self.layers if i not in ran]
        if missing:
            raise RuntimeError(
                f"attention capture: layers {missing} produced nothing; was enable_capture(model) called and do "
                "these layers exist in the language model?"
            )

    def mean(self) -> torch.Tensor:
        """(B, T, I) fp32: the mean over the captured layers × heads (``reduce=True`` captures)."""
        if not self.request.reduce:
            raise RuntimeError("mean() needs AttentionCapture(..., reduce=True); use stacked()")
        self._check_ran(self.request.seen)
        return self.request.total / (len(self.layers) * len(self.request.heads))

    def stacked(self) -> torch.Tensor:
        """(B, n_layers_sel, n_heads_sel, T, I) in layer order; raises if a layer never ran through the capture."""
        self._check_ran(self.request.out)
        return torch.stack([self.request.out[i] for i in self.layers], dim=1)
