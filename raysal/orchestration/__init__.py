"""Thin rooms: Ray Train / Tune / Hydra / W&B around the plain-PyTorch core (`raysal.loop.fit.fit`)."""
