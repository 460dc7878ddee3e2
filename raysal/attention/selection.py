"""Which LM layers and heads a criterion (or the evaluation protocol) looks at.

Presets split the layers into thirds: ``early`` / ``middle`` / ``late``; ``all`` takes every layer. Explicit lists
may use negative indices (``[-2, -1]`` = the last two layers). Heads are ``all``, an explicit list (every chosen
layer × every chosen head), or (layer, head) *pairs* ``[[l, h], ...]``, which choose the layers too: the heads
``python -m raysal.heads`` found (``heads: localization`` + ``top_k``, resolved from its heads.json by the entry
point, `raysal.attention.head_scores.localization_heads`).
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


def is_pairs(heads: object) -> bool:
    """True for (layer, head) pairs: a non-empty list of 2-element lists."""
    return (
        isinstance(heads, Sequence)
        and not isinstance(heads, str)
        and len(heads) > 0
        and all(isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 2 for x in heads)
    )


def resolve_pairs(pairs: Sequence[Sequence[int]], n_layers: int, n_heads: int) -> tuple[tuple[int, int], ...]:
    """(layer, head) pairs → sorted unique non-negative pairs, each checked against the model."""
    out = set()
    for layer, head in pairs:
        ly, hd = int(layer) + (n_layers if layer < 0 else 0), int(head) + (n_heads if head < 0 else 0)
        if not (0 <= ly < n_layers and 0 <= hd < n_heads):
            raise ValueError(f"heads: pair [{layer}, {head}] is not a head of a {n_layers}-layer, {n_heads}-head model")
        out.add((ly, hd))
    return tuple(sorted(out))


def resolve_selection(
    layers: str | Sequence[int], heads: str | Sequence, n_layers: int, n_heads: int
) -> tuple[tuple[int, int], ...]:
    """The (layer, head) pairs a criterion reads: its pairs, or every chosen layer × every chosen head."""
    if is_pairs(heads):
        return resolve_pairs(heads, n_layers, n_heads)  # type: ignore[arg-type]
    return tuple((ly, hd) for ly in resolve_layers(layers, n_layers) for hd in resolve_heads(heads, n_heads))


def resolve_heads(spec: str | Sequence[int], n_heads: int) -> tuple[int, ...]:
    """``all`` or explicit query-head indices → sorted unique head indices."""
    if spec == "localization":
        raise ValueError("heads: 'localization' is read from a heads.json of python -m raysal.heads by the entry "
                         "point; here it was not resolved")  # fmt: skip
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"heads: unknown preset {spec!r} (expected 'all' or a list of indices)")
        return tuple(range(n_heads))
    heads = tuple(sorted({i + n_heads if i < 0 else i for i in spec}))
    if not heads or any(not 0 <= i < n_heads for i in heads):
        raise ValueError(f"heads: {spec!r} selects no valid head of {n_heads} heads")
    return heads
