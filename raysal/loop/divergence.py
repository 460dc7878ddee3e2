"""Stop a run whose model stopped learning, with the reason: such a run must never be ranked or exported.

A non-finite loss is the obvious case (`raysal.loop.step.NonFiniteLossError`). The quiet one was seen in a search:
a huge learning rate left a model with uniform predictions and zero gradients — its val LM loss was ln(vocabulary)
— whose attention still scored a higher val/amr than a healthy trial's. Checks (each off when its setting is None):

* ``lm_loss_of_uniform``: val LM loss ≥ this × ln(V) — predictions as flat as a uniform guess over the vocabulary —
  from a model that started clearly better than that (its starting LM loss below `LEARNED` × the threshold): a
  model that *became* flat. A pretrained model starts far below ln(V), so this is the collapse above. A randomly
  initialised one (the demo's tiny model) starts at ln(V): it has learned nothing yet to lose, and this rule never
  judges it — staying near uniform is no divergence (the other checks still do: a loss far above its start, dead
  or exploding gradients);
* ``lm_loss_factor``: val LM loss > this × the LM loss of the very first training micro-batch (the starting model);
* ``zero_grad_steps``: the gradient norm was 0 for this many optimizer steps in a row;
* ``grad_norm_limit``: the gradient norm (before clipping) exceeded this: the weights are being blown apart (a
  learning rate far too large; clipping hides it from the update, not from the loss that follows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# the uniform rule judges a model whose starting LM loss was below this × its threshold: one that had learned
# something to lose (a random-init model starts at ln(V), above it)
LEARNED = 0.9


class DivergedError(RuntimeError):
    """The run diverged or died; the message says at which step and why."""


@dataclass(frozen=True)
class DivergenceConfig:
    lm_loss_of_uniform: float | None = 0.98
    lm_loss_factor: float | None = 3.0
    zero_grad_steps: int | None = 20
    grad_norm_limit: float | None = 1e6


class DivergenceGuard:
    """Fed by the loop after every optimizer step and every evaluation; raises `DivergedError`."""

    def __init__(self, cfg: DivergenceConfig, vocab_size: int) -> None:
        self.cfg = cfg
        self.uniform_loss = math.log(vocab_size)
        self.first_lm_loss: float | None = None
        self.zero_streak = 0

    def after_micro_batch(self, metrics: dict[str, float]) -> None:
        """Remember the starting model's LM loss: the first micro-batch's ``lm`` (or ``cal``) term."""
        if self.first_lm_loss is None:
            self.first_lm_loss = metrics.get("loss/lm", metrics.get("loss/cal"))

    def after_step(self, step: int, grad_norm: float) -> None:
        n = self.cfg.zero_grad_steps
        self.zero_streak = self.zero_streak + 1 if grad_norm == 0.0 else 0
        if n is not None and self.zero_streak >= n:
            raise DivergedError(f"step {step}: gradient norm 0 for {self.zero_streak} steps in a row (the model died)")
        limit = self.cfg.grad_norm_limit
        if limit is not None and grad_norm > limit:
            raise DivergedError(f"step {step}: gradient norm {grad_norm:.3g} > {limit:g} (the weights are blowing up)")

    def after_eval(self, step: int, val_lm_loss: float) -> None:
        c = self.cfg
        start = self.first_lm_loss
        if c.lm_loss_of_uniform is not None and start is not None:
            flat = c.lm_loss_of_uniform * self.uniform_loss
            if start < LEARNED * flat and val_lm_loss >= flat:
                raise DivergedError(
                    f"step {step}: val/lm_loss {val_lm_loss:.4g} ≥ {c.lm_loss_of_uniform:g} × ln(vocabulary) = "
                    f"{flat:.4g}: predictions as flat as a uniform guess, from a model that started at LM loss "
                    f"{start:.4g}"
                )
        if c.lm_loss_factor is not None and self.first_lm_loss and val_lm_loss > c.lm_loss_factor * self.first_lm_loss:
            raise DivergedError(
                f"step {step}: val/lm_loss {val_lm_loss:.4g} > {c.lm_loss_factor:g} × the starting LM loss "
                f"{self.first_lm_loss:.4g}"
            )
