"""raysal: saliency-aligned LoRA finetuning of LLaVA, searched with Ray Tune."""

__version__ = "0.1.0"
