"""AlignVLM's connector: vision features → convex combinations of the language model's own text embeddings.

    h  = LN₁(W₁ · F)            (…, d)    F: the vision tower's selected features (…, d_v)
    P  = softmax(LN₂(W₂ · h))   (…, V)    a distribution over the vocabulary per image token
    F' = P · E_text             (…, d)    E_text: the LM's input embeddings (V, d), read, never copied

Every image token the LM sees is then a point in the convex hull of its text embeddings, which is AlignVLM's cure
for out-of-distribution visual tokens. The module replaces ``multi_modal_projector`` (same call: image features
in, LM-width features out), so LLaVA and LLaVA-NeXT run it unchanged and the projector's learning rate, freezing
and LoRA ``modules_to_save`` apply to it as to the MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class AlignConnector(nn.Module):
    def __init__(self, vision_dim: int, hidden: int, vocab: int, embeddings: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, hidden)
        self.norm_1 = nn.LayerNorm(hidden)
        self.linear_2 = nn.Linear(hidden, vocab)
        self.norm_2 = nn.LayerNorm(vocab)
        # A getter, not a submodule: the embeddings stay the LM's (no second copy in the state dict or the adapter),
        # and a deep copy of this module (peft's modules_to_save) keeps reading the same ones.
        self._embeddings = embeddings

    def distribution(self, image_features: torch.Tensor) -> torch.Tensor:
        """P: (…, V) float32, each row a distribution over the vocabulary."""
        h = self.norm_1(self.linear_1(image_features))
        return torch.softmax(self.norm_2(self.linear_2(h)).float(), dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        e = self._embeddings()  # (V, d)
        p = self.distribution(image_features)  # (…, V)
        return (p @ e.float()).to(e.dtype)  # (…, d), in the convex hull of the rows of E


def install_align_connector(model: nn.Module) -> AlignConnector:
    """Replace a LLaVA / LLaVA-NeXT model's ``multi_modal_projector`` with a fresh `AlignConnector` (returned)."""
    inner = model.model
    old = inner.multi_modal_projector
    cfg = model.config
    vision_dim = old.linear_1.in_features  # the selected vision features (× layers when several are concatenated)
    text = cfg.text_config
    embed = model.get_input_embeddings()
    connector = AlignConnector(vision_dim, text.hidden_size, embed.weight.shape[0], lambda: embed.weight)
    connector.to(device=old.linear_1.weight.device, dtype=old.linear_1.weight.dtype)
    inner.multi_modal_projector = connector
    return connector
