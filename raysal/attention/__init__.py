"""Attention capture: exact image-key attention probabilities for selected layers, heads and query rows."""
