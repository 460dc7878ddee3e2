"""The train step and loop: plain PyTorch, no Ray/Hydra/W&B (those wrap `fit` from the entry points)."""
