"""``maskembed``: Locality Alignment's MaskEmbed, a self-supervised objective on the vision tower.

The trainable tower (the *student*: the vision tower with LoRA, ``lora.vision=true``) encodes the whole image —
in the step's own forward, so nothing is encoded twice; its patch embeddings at LLaVA's feature layer (the
projector's input, (N, n_p, d_v)) are masked with a random patch mask per image (``mask_ratio``: masked patches
become a learned mask token), and a light transformer decoder must reproduce what the *teacher* — the same tower
with its adapters switched off, i.e. the frozen base, no second copy of the weights — makes of the image with those
patches blanked (set to the normalised mean, 0). Loss: MSE over every patch and channel. Gradients reach the
student's LoRA weights and the decoder only.

The decoder (`MaskEmbedHead`) is attached to the model before it is wrapped for several workers (`attach`), so it
is trained, synchronised and checkpointed with the rest of the trainable state; its work runs inside the model's
forward (a hook on the projector while `during_forward` is open).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from raysal.criteria.inputs import CriterionInputs
from raysal.distributed import rank

HEAD = "raysal_maskembed"  # the decoder's attribute on the HF model


class MaskEmbedHead(nn.Module):
    """Mask token + learned positions + a small transformer encoder: masked student view → teacher's view."""

    def __init__(self, dim: int, n_patches: int, layers: int, heads: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.position = nn.Parameter(torch.zeros(n_patches, dim))
        nn.init.normal_(self.position, std=0.02)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)

    def forward(self, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """student (N, n_p, d) and mask (N, n_p) bool (True = masked) → predicted teacher view (N, n_p, d)."""
        x = torch.where(mask[..., None], self.mask_token.to(student.dtype), student)
        return self.decoder(x + self.position.to(x.dtype))


@dataclass
class _Request:
    mask_ratio: float
    generator: torch.Generator | None
    pixels: torch.Tensor | None = None  # (N, 3, H, W): what the vision tower encoded
    mask: torch.Tensor | None = None  # (N, n_p) bool
    prediction: torch.Tensor | None = None  # (N, n_p, d)


_ACTIVE: ContextVar[_Request | None] = ContextVar("raysal_maskembed", default=None)


def _core(model: nn.Module) -> nn.Module:
    """The HF model under DDP (.module) and peft (.get_base_model())."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _vision_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    req = _ACTIVE.get()
    if req is not None and req.pixels is None:  # the step's forward; not the teacher's (no request is open then)
        req.pixels = args[0] if args else kwargs["pixel_values"]


def _projector_input(module: nn.Module, args: tuple) -> None:
    req = _ACTIVE.get()
    if req is None or req.prediction is not None:
        return
    student = args[0]  # (N, n_p, d_v): the patch embeddings at the feature layer, CLS dropped
    head = module._raysal_maskembed_head()
    n, n_p = student.shape[:2]
    rand = torch.rand(n, n_p, generator=req.generator, device="cpu").to(student.device)
    req.mask = rand < req.mask_ratio  # (N, n_p)
    req.prediction = head(student, req.mask)


@dataclass
class MaskEmbedCriterion:
    weight: float = 1.0
    mask_ratio: float = 0.5
    decoder_layers: int = 1
    seed: int = 0
    name: str = "maskembed"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})
    replaces_lm: ClassVar[bool] = False
    # the projector's input at one feature layer of a fixed patch grid: LLaVA's; Qwen's vision tower resizes each
    # image to its own grid and merges patches inside the tower (no projector input to mask and rebuild)
    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next")

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"maskembed: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_layers < 1:
            raise ValueError(f"maskembed: decoder_layers must be >= 1, got {self.decoder_layers}")
        self._generator: torch.Generator | None = None  # made in the worker (a spec travels pickled to Ray)

    def attach(self, model: nn.Module) -> None:
        """Add the decoder to the HF model and hook it in (once; before DDP / FSDP wrapping)."""
        core = _core(model)
        if hasattr(core, HEAD):
            return
        if core.config.model_type not in self.families:
            raise ValueError(f"maskembed: LLaVA's vision tower and projector only ({', '.join(self.families)}), "
                             f"not {core.config.model_type}")  # fmt: skip
        if not isinstance(core.config.vision_feature_layer, int):
            raise ValueError("maskembed: needs one vision feature layer (vision_feature_layer is a list here)")
        vision, projector = core.model.vision_tower, core.model.multi_modal_projector
        cfg = vision.config
        n_p = (cfg.image_size // cfg.patch_size) ** 2
        head = MaskEmbedHead(cfg.hidden_size, n_p, self.decoder_layers, cfg.num_attention_heads)
        p = next(vision.parameters())
        setattr(core, HEAD, head.to(device=p.device, dtype=torch.float32))
        # the projector finds the head through a getter: a deep copy (peft's modules_to_save) keeps the same one
        object.__setattr__(projector, "_raysal_maskembed_head", lambda: getattr(core, HEAD))
        vision.register_forward_pre_hook(_vision_input, with_kwargs=True)
        projector.register_forward_pre_hook(_projector_input)

    @contextmanager
    def during_forward(self) -> Iterator[None]:
        """Open around the step's forward and the criteria (`raysal.loop.step.train_step` does)."""
        if self._generator is None:  # masks differ across ranks, repeat for a seed
            self._generator = torch.Generator().manual_seed(self.seed * 1000 + rank())
        token = _ACTIVE.set(_Request(self.mask_ratio, self._generator))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def __call__(self, x: CriterionInputs) -> torch.Tensor:
        assert x.model is not None
        req = _ACTIVE.get()
        if req is None or req.prediction is None or req.pixels is None or req.mask is None:
            raise RuntimeError("maskembed: the step's forward encoded no image under during_forward() (attach?)")
        teacher = self.teacher_view(x.model, req.pixels, req.mask)  # (N, n_p, d)
        return torch.mean((req.prediction.float() - teacher.float()) ** 2)

    @torch.no_grad()
    def teacher_view(self, model: nn.Module, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen tower (adapters off) on the image with the masked patches blanked: (N, n_p, d) at LLaVA's
        feature layer, CLS dropped as the projector's input is."""
        core = _core(model)
        vision = core.model.vision_tower
        ps = vision.config.patch_size
        n, _, h, w = pixels.shape
        grid = mask.view(n, h // ps, w // ps)  # (N, gh, gw)
        keep = ~grid.repeat_interleave(ps, 1).repeat_interleave(ps, 2)  # (N, H, W)
        blanked = pixels * keep[:, None].to(pixels.dtype)
        peft = getattr(model, "module", model)
        off = peft.disable_adapter() if hasattr(peft, "disable_adapter") else _null()
        with off:
            hidden = vision(blanked, output_hidden_states=True).hidden_states
        layer = core.config.vision_feature_layer
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], -1)
        return feats[:, 1:] if core.config.vision_feature_select_strategy == "default" else feats


@contextmanager
def _null() -> Iterator[Any]:
    yield
