"""Tiny random-init LLaVA / LLaVA-NeXT / Qwen2.5-VL / Qwen3-VL checkpoints:
``python -m raysal.model.tiny --out DIR --arch llava`` (or llava_next, qwen2_5_vl, qwen3_vl).

Everything a real hub checkpoint has — config, weights, a fast tokenizer (built here, covering the synthetic
captions), an image-processor config with the real geometry (336 px, 14 px patches, NeXT pinpoints; Qwen's
smart-resize with 14 / 16 px patches and 2×2 merging) and a chat template — written with ``save_pretrained`` and
loaded back through the same `raysal.model.build` path as ``llava-hf/llava-1.5-7b-hf`` or
``Qwen/Qwen2.5-VL-7B-Instruct``. Only the widths and depths are small (and Qwen's pixel limits, pinned by the
model config as for the 7B ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from raysal.data.synthetic import COLOURS, OPENERS, STUFF, THINGS, WORDS
from raysal.model.qwen_processor import IMAGE_ONLY

IMAGE_TOKEN = "<image>"
# single tokens, so the hallucination probe (`raysal.metrics.pope`) can read their logits; with the leading space
# too, as Llama's "▁Yes": the chat template writes "ASSISTANT: Yes", so the first answer token is " Yes", not "▁"
ANSWERS = ("Yes", "No", " Yes", " No")
FORMAT = 3  # of what `write_tiny` writes (2: the answer tokens, 3: with their spaces): older ones are written again
STAMP = "raysal_tiny.json"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 defaults
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen's pixel limits written into the tiny processors (min: the processors' default 56², max: 256 merged tokens)
TINY_PIXELS = (56 * 56, 256 * 28 * 28)

# Same shape of template as the llava-hf checkpoints: the user turn holds the image and the prompt, the assistant
# turn the caption. {{ '<image>' }} is expanded by the processor into one token per image feature.
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT:{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}"
)


# Qwen's special tokens (the hub ids differ; the config names the ones of this vocabulary)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]  # fmt: skip
# Qwen2.5-VL-Instruct's template for image and text parts (video parts and add_vision_id left out): a default
# system turn, then ChatML turns; <|image_pad|> is expanded by the processor into one token per merged patch pair
QWEN25_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-Instruct's for plain turns (its tool and thinking branches left out): no default system turn
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: synthetic caption words in caption-like order, prompts, template words."""
    lines = ["USER: ASSISTANT: [INST] [/INST] Describe the image in detail. Describe this picture."]
    lines += [
        f"{o} a {c} {t} on the left, in front of the {s}."
        for o in OPENERS
        for c in COLOURS
        for t in THINGS.values()
        for s in STUFF.values()
    ]
    lines += [f"two {c} {t}s and three {c} {t}s" for c in COLOURS for t in THINGS.values()]
    lines += [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS)]
    return lines


def build_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A SentencePiece-style (metaspace) BPE fast tokenizer, like Llama's, trained on the synthetic vocabulary."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(
        set("".join(_corpus())) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()[]/-\n")
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    # POPE's answers, one token each as in Llama's and Mistral's vocabularies (the synthetic captions never say
    # them, so BPE would split them); whole words only, appended after every other id
    fast.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in ANSWERS])
    return fast


def build_qwen_tokenizer(vocab_size: int = 700) -> Qwen2Tokenizer:
    """A byte-level BPE as Qwen2's (its own class, vocab and merges trained here on the synthetic vocabulary), with
    Qwen's special tokens and POPE's answers as single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    fast = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=QWEN_SPECIAL[1:],
    )  # fmt: skip
    fast.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in ANSWERS])
    return fast


def qwen_tiny_config(arch: str, tok: Qwen2Tokenizer) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    """4 layers, 4 query heads on 2 KV heads (grouped, as the 7B/8B ones), M-RoPE sections summing to head_dim/2;
    the real patch sizes and merge; Qwen3-VL's DeepStack from 2 vision layers into the first 2 decoder layers."""
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>")]}  # fmt: skip
    text = {"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id}  # fmt: skip
    if arch == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 64,
                  "fullatt_block_indexes": [1]}  # fmt: skip
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    text |= {"head_dim": 16, "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2],
                                                 "mrope_interleaved": True, "rope_theta": 5e6}}  # fmt: skip
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64, "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0, 1]}  # fmt: skip
    return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)


def _qwen_processor(arch: str, tok: Qwen2Tokenizer):
    from transformers import Qwen2VLImageProcessorPil  # Pillow backend: no torchvision here (as `_image_processor`)

    min_pixels, max_pixels = TINY_PIXELS
    if arch == "qwen2_5_vl":
        ip = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                      size={"shortest_edge": min_pixels, "longest_edge": max_pixels})  # fmt: skip
        return IMAGE_ONLY[arch](image_processor=ip, tokenizer=tok, chat_template=QWEN25_TEMPLATE)
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  size={"shortest_edge": min_pixels, "longest_edge": max_pixels})  # fmt: skip
    return IMAGE_ONLY[arch](image_processor=ip, tokenizer=tok, chat_template=QWEN3_TEMPLATE)


def _vision(patch_size: int) -> CLIPVisionConfig:
    # the real 336 px input (14 px patches: 24×24 = 576 patches, as the hub's), tiny widths
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=336,
        patch_size=patch_size, projection_dim=32,
    )  # fmt: skip


def tiny_config(
    arch: str, vocab_size: int, image_token_id: int, pad_token_id: int, patch_size: int = 14
) -> LlavaConfig | LlavaNextConfig:
    common = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "max_position_embeddings": 4096, "pad_token_id": pad_token_id, "tie_word_embeddings": False}  # fmt: skip
    if arch == "llava":
        text = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
        return LlavaConfig(
            vision_config=_vision(patch_size), text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu",
        )  # fmt: skip
    if arch == "llava_next":
        # Mistral with grouped-query attention, as llava-v1.6-mistral-7b (32 query heads, 8 KV heads)
        text = MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common)
        return LlavaNextConfig(
            vision_config=_vision(patch_size), text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS, projector_hidden_act="gelu",
        )  # fmt: skip
    raise ValueError(f"unknown arch {arch!r} (expected 'llava' or 'llava_next')")


def _image_processor(arch: str):
    # Pillow backend: needs no torchvision, which has no CPU wheel here; same geometry as the torchvision one.
    # each arch's class imported where it is used: transformers loads a processor class's module on first access
    if arch == "llava":
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
            image_mean=CLIP_MEAN, image_std=CLIP_STD,
        )  # fmt: skip
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip


def write_tiny(out: Path | str, arch: str, seed: int = 0, patch_size: int = 14) -> Path:
    """Write a tiny checkpoint to ``out`` and return the path."""
    out = Path(out)
    torch.manual_seed(seed)
    if arch in ("qwen2_5_vl", "qwen3_vl"):
        qtok = build_qwen_tokenizer()
        qcls = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
        qcls(qwen_tiny_config(arch, qtok)).save_pretrained(out)
        _qwen_processor(arch, qtok).save_pretrained(out)
        (out / STAMP).write_text(json.dumps({"arch": arch, "seed": seed, "format": FORMAT}))
        return out
    tok = build_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_config(arch, len(tok), image_token_id, tok.pad_token_id, patch_size)
    processor_kwargs = {"patch_size": patch_size, "vision_feature_select_strategy": "default",
                        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1}  # fmt: skip
    if arch == "llava":
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=_image_processor(arch), tokenizer=tok, chat_template=LLAVA_TEMPLATE, **processor_kwargs
        )
    else:
        model = LlavaNextForConditionalGeneration(config)
        processor = LlavaNextProcessor(
            image_processor=_image_processor(arch), tokenizer=tok, chat_template=NEXT_TEMPLATE, **processor_kwargs
        )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / STAMP).write_text(json.dumps({"arch": arch, "seed": seed, "format": FORMAT}))
    return out


def is_current(out: Path | str) -> bool:
    """A whole tiny checkpoint (its stamp is written last) in this version's format."""
    try:
        return json.loads((Path(out) / STAMP).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysal.model.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", choices=["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"], default="llava")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = write_tiny(args.out, args.arch, args.seed)
    print(f"wrote tiny {args.arch} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
