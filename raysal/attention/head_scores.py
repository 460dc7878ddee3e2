"""Which (layer, head) already grounds: every head of the base model scored on validation samples by its
text → image attention (the Localization Heads criteria, with the regions COCONut gives us).

Per grounded caption token t and head (ℓ, h), from the captured probabilities of t's query row over the image
tokens, ``a (I,)`` (not renormalised):

* ``mass``: Σ_i a(i), the share of the row's attention that goes to the image at all;
* ``entropy``: the Shannon entropy of a / Σ a over the valid image tokens, divided by log |I| (1: uniform, 0: one
  token) — how concentrated the head looks; Localization Heads uses a spatial entropy of thresholded connected
  components on a 2-D grid, which LLaVA-NeXT's anyres layout (base view + tiles + newlines) does not have;
* ``amr`` and ``pointing``: the grounding metrics of `raysal.metrics.grounding` against t's region.

Each is the mean over tokens where it is defined. The ranking is by AMR (what ``val/amr`` measures, per head).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from raysal import storage
from raysal.attention.capture import AttentionCapture
from raysal.attention.targets import grounding_targets, renormalise
from raysal.batch import model_inputs
from raysal.metrics.grounding import token_scores

SCORES = ("amr", "pointing", "mass", "entropy")


@dataclass
class HeadTable:
    """Mean scores per (layer, head): each (n_layers, n_heads) float64; ``tokens`` grounded tokens scored."""

    amr: torch.Tensor
    pointing: torch.Tensor
    mass: torch.Tensor
    entropy: torch.Tensor
    tokens: int
    images: int

    def ranked(self) -> list[dict]:
        """Every head as {layer, head, amr, pointing, mass, entropy, rank}, best AMR first (NaN last)."""
        n_layers, n_heads = self.amr.shape
        rows = [
            {"layer": ly, "head": hd, **{k: float(getattr(self, k)[ly, hd]) for k in SCORES}}
            for ly in range(n_layers)
            for hd in range(n_heads)
        ]
        rows.sort(key=lambda r: (math.isnan(r["amr"]), -r["amr"] if not math.isnan(r["amr"]) else 0.0))
        for i, r in enumerate(rows):
            r["rank"] = i + 1
        return rows


class _Sums:
    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sum = {k: torch.zeros(n_layers, n_heads, dtype=torch.float64) for k in SCORES}
        self.count = {k: torch.zeros(n_layers, n_heads, dtype=torch.float64) for k in SCORES}

    def add(self, name: str, values: torch.Tensor) -> None:
        """values: (N, ℓ, h), NaN where undefined."""
        ok = ~torch.isnan(values)
        self.sum[name] += torch.where(ok, values, torch.zeros_like(values)).sum(0).cpu()
        self.count[name] += ok.sum(0).to(torch.float64).cpu()

    def mean(self, name: str) -> torch.Tensor:
        c = self.count[name]
        return torch.where(c > 0, self.sum[name] / c.clamp_min(1), torch.full_like(c, float("nan")))


@torch.no_grad()
def score_heads(
    model: torch.nn.Module,
    batches: Iterable[dict],  # device batches (`raysal.batch.to_device`)
    n_layers: int,
    n_heads: int,
    *,
    query_offset: int = 0,
    theta: float = 0.5,
) -> HeadTable:
    """Score every head of ``model`` (in the capture attention implementation: `enable_capture`)."""
    was_training = model.training
    model.eval()
    sums, tokens, images = _Sums(n_layers, n_heads), 0, 0
    try:
        for batch in batches:
            t = grounding_targets(batch, query_offset)
            with AttentionCapture(range(n_layers), range(n_heads), t.query_pos, t.key_pos) as cap:
                model(**model_inputs(batch), use_cache=False)
            att = cap.stacked()  # (B, ℓ, h, T, I) probabilities over the image tokens, not renormalised
            B, L, H, T, I = att.shape
            v = t.token_valid  # (B, T)
            n = int(v.sum())
            if n == 0:
                continue
            valid = t.key_valid[:, None, :].expand(B, T, I)[v]  # (N, I)
            region = t.region[v]  # (N, I)
            per_layer: dict[str, list[torch.Tensor]] = {k: [] for k in SCORES}
            # one layer at a time in float64: (N, h, I), not (N, ℓ, h, I) — 7.7 GB for NeXT-7B's 32 × 32 heads
            for ly in range(L):
                a = att[:, ly].permute(0, 2, 1, 3)[v].double()  # (N, h, I)
                vm = valid[:, None, :]  # (N, 1, I)
                per_layer["mass"].append((a * vm).sum(-1))
                p = renormalise(a, valid)  # (N, h, I), zero at invalid tokens
                log_i = torch.log(valid.sum(-1).clamp_min(2).double())[:, None]  # (N, 1)
                per_layer["entropy"].append(-(p * torch.log(p.clamp_min(1e-30))).sum(-1) / log_i)
                flat = token_scores(a.reshape(n * H, I), region[:, None, :].expand(n, H, I).reshape(n * H, I),
                                    vm.expand(n, H, I).reshape(n * H, I), theta=theta)  # fmt: skip
                per_layer["amr"].append(flat.amr.view(n, H))
                per_layer["pointing"].append(flat.pointing.view(n, H))
            for k in SCORES:
                sums.add(k, torch.stack(per_layer[k], dim=1))  # (N, ℓ, h)
            tokens += n
            images += B
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no grounded token in the samples: nothing to score the heads on")
    return HeadTable(**{k: sums.mean(k) for k in SCORES}, tokens=tokens, images=images)


HEADS_FILE = "heads.json"
HEADS_FIGURE = "heads.png"


def heads_folder(out: str, name_or_path: str) -> str:
    """Where ``python -m raysal.heads`` writes a model's table and picture: ``<out>/<the hub id's or folder's last
    part>``, a local folder or a storage URI (``finder.out``: the search's storage on a cluster)."""
    return storage.join(str(out), name_or_path.rstrip("/").rsplit("/", 1)[-1])


def heads_file(out: str, name_or_path: str) -> str:

    return storage.join(heads_folder(out, name_or_path), HEADS_FILE)


def localization_heads(path: str, top_k: int, name_or_path: str) -> list[list[int]]:
    """The ``top_k`` best (layer, head) pairs of a heads.json, for ``name_or_path``; a clear error otherwise."""
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path}: no heads.json for {name_or_path}; run `python -m raysal.heads` with the "
                                "same model and data first")  # fmt: skip
    table = storage.read_json(path)
    if table.get("model") != name_or_path:
        raise ValueError(f"{path}: scored for {table.get('model')!r}, not {name_or_path!r}")
    if not 1 <= top_k <= len(table["heads"]):
        raise ValueError(f"top_k={top_k}: {path} has {len(table['heads'])} heads")
    rows = sorted(table["heads"], key=lambda r: r["rank"])[:top_k]
    return [[int(r["layer"]), int(r["head"])] for r in rows]
