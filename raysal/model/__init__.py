"""Model building: LLaVA / LLaVA-NeXT from the hub or a local path, LoRA via peft, tiny test checkpoints."""
