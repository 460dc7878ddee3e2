"""Build LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL / Qwen3-VL for saliency-aligned LoRA finetuning.

The same code path loads ``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-v1.6-mistral-7b-hf``,
``Qwen/Qwen2.5-VL-7B-Instruct``, ``Qwen/Qwen3-VL-8B-Instruct`` or a local folder (the tiny checkpoints of
`raysal.model.tiny` included): ``from_pretrained`` by hub id or path, nothing tiny-only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from raysal import storage
from raysal.model.align_connector import install_align_connector
from raysal.model.qwen_processor import IMAGE_ONLY

LLAVA = ("llava", "llava_next")
QWEN = ("qwen2_5_vl", "qwen3_vl")  # their projector ("merger") lives inside the vision tower
SUPPORTED = LLAVA + QWEN
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {"qv": ("q_proj", "v_proj"), "qkvo": ATTENTION, "all-linear": ATTENTION + MLP}
PROJECTOR = "multi_modal_projector"
# the modules that map vision features into the language model's embeddings, by family: LLaVA's projector; Qwen's
# merger and (Qwen3-VL) its DeepStack mergers, which live inside the vision tower (LLaMA-Factory's projector too)
PROJECTORS = (PROJECTOR, "visual.merger", "visual.deepstack_merger_list")
VISION = (".vision_tower.", ".visual.")  # in a parameter's name: LLaVA's CLIP tower; Qwen's ViT with its merger
NEWLINE = "image_newline"  # LLaVA-NeXT's learned row separator: trained with the projector (same input side)


@dataclass(frozen=True)
class ModelInfo:
    """What the step needs to know about the language model."""

    image_token_id: int
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int


def model_info(model: torch.nn.Module) -> ModelInfo:
    cfg = model.config
    text = cfg.text_config
    return ModelInfo(
        image_token_id=int(cfg.image_token_id),
        n_layers=int(text.num_hidden_layers),
        n_heads=int(text.num_attention_heads),
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
    )


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """'auto' = bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and imprecise)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}") from None


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    gradient_checkpointing: bool = False,
    connector: str = "mlp",
    connector_init: str | Path | None = None,
) -> PreTrainedModel:
    """LLaVA or LLaVA-NeXT with SDPA attention (the capture switches the language model later). ``connector``:
    ``mlp`` keeps the checkpoint's projector; ``align`` puts a fresh AlignVLM connector in its place
    (`raysal.model.align_connector`). ``connector_init``: a ``connector/`` folder saved by a connector-only stage
    (`save_connector`), loaded into it."""
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, device), attn_implementation="sdpa"
    )
    if model.config.model_type not in SUPPORTED:
        raise ValueError(f"{name_or_path}: model_type {model.config.model_type!r} is not one of {SUPPORTED}")
    if model.config.model_type in QWEN and (connector != "mlp" or connector_init is not None):
        raise ValueError(f"{name_or_path}: model.connector / model.connector_init are LLaVA's (a projector between "
                         "the towers); Qwen's merger lives in its vision tower")  # fmt: skip
    if connector == "align":
        install_align_connector(model)
    elif connector != "mlp":
        raise ValueError(f"connector must be mlp or align, got {connector!r}")
    if connector_init is not None:
        load_connector(model, connector_init, connector)
    model.to(device)
    if gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and with the capture context kept open through backward
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def pixel_limits(model: dict) -> dict[str, int | None]:
    """A model config's (``model.*``) pixel limits as `load_processor`'s keywords."""
    return {"min_pixels": model.get("min_pixels"), "max_pixels": model.get("max_pixels")}


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The checkpoint's processor. Qwen: without its video part (`raysal.model.qwen_processor`), its image
    processor's pixel limits set to ``min_pixels`` / ``max_pixels`` (the model config pins them, so training, the
    evaluations and the export resize alike); LLaVA has none to set."""
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type not in QWEN:
        if min_pixels is not None or max_pixels is not None:
            raise ValueError(f"{name_or_path}: model.min_pixels / model.max_pixels are Qwen's pixel limits; a "
                             f"{model_type} processor has a fixed size (set them to null)")  # fmt: skip
        return AutoProcessor.from_pretrained(name_or_path)
    processor = IMAGE_ONLY[model_type].from_pretrained(name_or_path)
    ip = processor.image_processor
    lo = int(min_pixels) if min_pixels is not None else int(ip.size["shortest_edge"])
    hi = int(max_pixels) if max_pixels is not None else int(ip.size["longest_edge"])
    if not 0 < lo <= hi:
        raise ValueError(f"model.min_pixels={lo} / model.max_pixels={hi}: need 0 < min_pixels <= max_pixels")
    ip.size = {"shortest_edge": lo, "longest_edge": hi}
    return processor


VISION_LORA = r".*vision_tower\..*encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"


def lora_target_regex(targets: str | Sequence[str], vision: bool = False) -> str:
    """Module-name regex for peft: language-model linears (never the projector or lm_head); with ``vision``, the
    vision tower's attention linears too (a trainable student for `maskembed`)."""
    names = LORA_TARGETS.get(targets) if isinstance(targets, str) else tuple(targets)
    if names is None:
        raise ValueError(f"lora targets: unknown preset {targets!r} (expected {sorted(LORA_TARGETS)} or a list)")
    unknown = sorted(set(names) - set(ATTENTION + MLP))
    if unknown:
        raise ValueError(f"lora targets: {unknown} are not language-model linears {ATTENTION + MLP}")
    lm = rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"
    return f"({lm})|({VISION_LORA})" if vision else lm


def _projector_keys(model: torch.nn.Module) -> list[str]:
    """peft ``modules_to_save`` keys of the model's `PROJECTORS`: one per module (peft wraps a module, not a
    ModuleList: each of Qwen3-VL's DeepStack mergers on its own)."""
    keys = set()
    for name, module in model.named_modules():
        for p in PROJECTORS:
            if name == p or name.endswith(f".{p}"):
                many = isinstance(module, torch.nn.ModuleList)
                keys |= {f"{p}.{i}" for i in range(len(module))} if many else {p}
    return sorted(keys)


def apply_lora(
    model: PreTrainedModel,
    *,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    targets: str | Sequence[str] = "qv",
    train_projector: bool = False,
    vision: bool = False,
) -> PeftModel:
    """Freeze the base, add LoRA to the language model; optionally train the projector (saved with the adapter)."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    projectors = None
    if train_projector:  # peft trains a full copy of each; a name that matches nothing would be dropped silently
        projectors = _projector_keys(model)
        if not projectors:
            raise ValueError(f"lora.train_projector: {type(model).__name__} has none of {PROJECTORS}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(targets, vision),
        modules_to_save=projectors,
        bias="none",
    )
    return get_peft_model(model, config)


def is_projector(name: str) -> bool:
    """A parameter of the vision → language mapping (`PROJECTORS`, NeXT's image newline): the projector's group."""
    return NEWLINE in name or any(f".{p}." in f".{name}" for p in PROJECTORS)


def prepare_full_finetune(
    model: PreTrainedModel, *, train_projector: bool = True, train_vision: bool = False
) -> PreTrainedModel:
    """Full finetuning (the upstream paper's regime): every language-model weight trains (embeddings, decoder
    layers, norm, lm_head); the projector (and NeXT's image newline) if ``train_projector``; the vision tower only
    if ``train_vision``. No adapters: checkpoints hold the model itself (`raysal.loop.checkpoint`)."""
    for name, p in model.named_parameters():
        if is_projector(name):  # first: Qwen's merger is inside its vision tower
            p.requires_grad_(train_projector)
        elif any(v in f".{name}" for v in VISION):
            p.requires_grad_(train_vision)
        else:
            p.requires_grad_(True)
    return model


CONNECTOR_FILE = "connector.safetensors"
CONNECTOR_META = "connector.json"


def prepare_connector_stage(model: PreTrainedModel) -> PreTrainedModel:
    """The connector-only stage: every weight frozen but the connector's (and NeXT's image newline)."""
    if model.config.model_type in QWEN:
        raise ValueError(
            "trainer.stage=connector is LLaVA's projector-only stage (a connector between the towers, saved on its "
            "own); Qwen's merger lives in its vision tower: use lora.train_projector"
        )
    for name, p in model.named_parameters():
        p.requires_grad_(is_projector(name))
    return model


def save_connector(model: torch.nn.Module, dest: Path, kind: str) -> None:
    """``dest/connector.safetensors`` (the connector's weights, NeXT's image newline too) + ``connector.json``."""
    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if PROJECTOR in n or NEWLINE in n}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dest / CONNECTOR_FILE))
    (dest / CONNECTOR_META).write_text(json.dumps({"connector": kind, "parameters": sorted(state)}, indent=2))


def load_connector(model: torch.nn.Module, folder: str | Path, kind: str) -> None:
    """Load a saved connector into ``model`` (the same connector kind, the same shapes), or fail with the reason.
    ``folder`` is a local folder or a storage URI (a search's ``best_connector/`` lives on its storage)."""

    folder = str(folder)
    meta_file, weights = storage.join(folder, CONNECTOR_META), storage.join(folder, CONNECTOR_FILE)
    if not storage.is_file(meta_file) or not storage.is_file(weights):
        raise FileNotFoundError(f"model.connector_init={folder}: no {CONNECTOR_META} / {CONNECTOR_FILE} (a connector/ "
                                "folder of a trainer.stage=connector run, or its best_connector/)")  # fmt: skip
    saved = storage.read_json(meta_file)["connector"]
    if saved != kind:
        raise ValueError(
            f"model.connector_init={folder}: the saved connector is {saved!r}, but model.connector={kind!r}"
        )
    state = load_safetensors(storage.read_bytes(weights))  # the projector: tens of MB at 7B, read whole
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params or params[name].shape != value.shape:
            have = tuple(params[name].shape) if name in params else "missing"
            raise ValueError(f"model.connector_init={folder}: {name} {tuple(value.shape)} does not fit this model "
                             f"({have}): saved for another model?")  # fmt: skip
        with torch.no_grad():
            params[name].copy_(value)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder layers (LLaVA and LLaVA-NeXT: ``model.language_model.layers``)."""
    core = getattr(model, "module", model)
    inner = getattr(core, "model", None)
    layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(core).__name__}: no language_model.layers (not a LLaVA / LLaVA-NeXT model?)")
    return layers


def param_groups(
    model: torch.nn.Module, lr: float, projector_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Trainable parameters: LoRA (or, full finetuning, the language model and a trained vision tower) at ``lr``,
    the projector (if trained) at ``projector_lr`` (LLaVA: lr / 10)."""
    main, projector = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projector if is_projector(name) else main).append(p)
    if not main and not projector:
        raise ValueError("no trainable parameters: did apply_lora or prepare_full_finetune run?")
    core = getattr(model, "module", model)
    groups = [{"params": main, "lr": lr, "weight_decay": weight_decay,
               "name": "lora" if hasattr(core, "peft_config") else "model"}]  # fmt: skip
    if projector:
        groups.append(
            {"params": projector, "lr": projector_lr or lr, "weight_decay": weight_decay, "name": "projector"}
        )
    return groups
