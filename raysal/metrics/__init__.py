"""Evaluation metrics (plain PyTorch): grounding of caption tokens in image-token attention."""
