"""Qwen2.5-VL / Qwen3-VL processors for images only.

transformers' ``Qwen2_5_VLProcessor`` and ``Qwen3VLProcessor`` require a video processor, and the Qwen2-VL video
processor requires torchvision (transformers 5.25: ``AutoProcessor.from_pretrained`` fails with "Can't load video
processor" without it, and torchvision has no CPU wheel for the CPU torch here). raysal feeds images only, so it
loads the processor without its video part: the same class, the same image processor, tokenizer and chat template,
and the same ``processor_class`` name in ``processor_config.json`` (what raysal saves loads with
``AutoProcessor`` wherever torchvision is installed, as lmms-eval's ``qwen2_5_vl`` / ``qwen3_vl`` classes do).
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without ``video_processor`` (its attributes come from this signature)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without ``video_processor``."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# saved under the library's class name, so that AutoProcessor resolves the folder to transformers' own class
ImageOnlyQwen2_5_VLProcessor.__name__ = "Qwen2_5_VLProcessor"
ImageOnlyQwen3VLProcessor.__name__ = "Qwen3VLProcessor"
# model_type → the image-only class
IMAGE_ONLY = {"qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor, "qwen3_vl": ImageOnlyQwen3VLProcessor}
