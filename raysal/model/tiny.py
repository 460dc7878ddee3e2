"""Tiny random-init LLaVA / LLaVA-NeXT checkpoints: ``python -m raysal.model.tiny --out DIR --arch llava``.

Everything a real hub checkpoint has — config, weights, a fast tokenizer (built here, covering the synthetic
captions), an image-processor config with the real geometry (336 px, 14 px patches, NeXT pinpoints) and a chat
template — written with ``save_pretrained`` and loaded back through the same `raysal.model.build` path as
``llava-hf/llava-1.5-7b-hf``. Only the widths and depths are small.
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
)

from raysal.data.synthetic import COLOURS, OPENERS, STUFF, THINGS, WORDS

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
    ap.add_argument("--arch", choices=["llava", "llava_next"], default="llava")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = write_tiny(args.out, args.arch, args.seed)
    print(f"wrote tiny {args.arch} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
