"""Which LM layers and heads a criterion (or the evaluation protocol) looks at.

Presets split the layers into thirds: ``early`` / ``middle`` / ``late``; ``all`` takes every layer. Explicit lists
may use negative indices (``[-2, -1]`` = the last two layers). Heads are ``all`` or an explicit list.
"""

from __future__ import annotations

from collections.abc import Sequence

LAYER_PRESETS = ("all", "early", "middle", "late")


def resolve_layers(spec: str | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """A preset name or explicit indices → sorted unique non-negative layer indices."""
    if isinstance(spec, str):
        third = max(1, n_layers // 3)
        bands = {
            "all": range(n_layers),
            "early": range(0, third),
            "middle": range(third, n_layers - third),
            "late": range(n_layers - third, n_layers),
        }
        if spec not in bands:
            raise ValueError(f"layers: unknown preset {spec!r} (expected one of {LAYER_PRESETS} or a list of indices)")
        layers = tuple(bands[spec])
    else:
        layers = tuple(sorted({i + n_layers if i < 0 else i for i in spec}))
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"layers: {spec!r} selects no valid layer of a {n_layers}-layer model")
    return layers


def resolve_heads(spec: str | Sequence[int], n_heads: int) -> tuple[int, ...]:
    """``all`` or explicit query-head indices → sorted unique head indices."""
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"heads: unknown preset {spec!r} (expected 'all' or a list of indices)")
        return tuple(range(n_heads))
    heads = tuple(sorted({i + n_heads if i < 0 else i for i in spec}))
    if not heads or any(not 0 <= i < n_heads for i in heads):
        raise ValueError(f"heads: {spec!r} selects no valid head of {n_heads} heads")
    return heads
