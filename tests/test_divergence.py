"""The divergence guard: a run that stopped learning stops with its reason; one that is still learning does not."""

from __future__ import annotations

import math

import pytest

from raysal.loop.divergence import DivergedError, DivergenceConfig, DivergenceGuard

V = 32000
LN_V = math.log(V)


def guard(first: float | None, **cfg) -> DivergenceGuard:
    g = DivergenceGuard(DivergenceConfig(**cfg), V)
    if first is not None:
        g.after_micro_batch({"loss/lm": first})
    return g


def test_a_pretrained_model_that_collapses_to_uniform_is_stopped():
    g = guard(first=2.1)
    g.after_eval(2, 2.0)
    with pytest.raises(DivergedError, match="flat as a uniform guess"):
        g.after_eval(4, LN_V)


def test_a_random_model_still_near_uniform_but_learning_is_not_stopped():
    """The demo's tiny model starts at ln(V): 0.99·ln(V) at the first evaluation is progress, not a collapse."""
    g = guard(first=LN_V + 0.01)
    g.after_eval(2, 0.99 * LN_V)
    g.after_eval(4, 0.985 * LN_V)


def test_a_random_model_is_never_judged_by_the_uniform_rule():
    """Issue 29: the demo's random-init model (V = 345: ln V = 5.84) started at ln(V) and spiked to 6.123 at an
    evaluation, above 0.98 × ln(V); it had learned nothing to lose: not 'diverged'. Its other checks still hold."""
    v = 345
    g = DivergenceGuard(DivergenceConfig(), v)
    g.after_micro_batch({"loss/lm": math.log(v) + 0.02})
    for step, loss in ((5, 5.754), (10, 6.123), (15, 0.995 * math.log(v)), (20, math.log(v))):
        g.after_eval(step, loss)
    with pytest.raises(DivergedError, match="starting LM loss"):
        g.after_eval(25, 3.1 * math.log(v))  # far above its start: still stopped


def test_the_uniform_rule_says_what_it_saw():
    g = guard(first=0.8 * 0.98 * LN_V)  # started clearly better than uniform, then became flat
    with pytest.raises(DivergedError, match=r"from a model that started at LM loss 8\.133"):
        g.after_eval(2, LN_V)
    guard(first=0.95 * 0.98 * LN_V).after_eval(2, LN_V)  # barely better than uniform at the start: not judged


def test_loss_far_above_the_start_and_dead_gradients_are_stopped():
    with pytest.raises(DivergedError, match="starting LM loss"):
        guard(first=2.0).after_eval(2, 6.5)
    g = guard(first=2.0, zero_grad_steps=3)
    g.after_step(1, 0.0)
    g.after_step(2, 0.0)
    with pytest.raises(DivergedError, match="gradient norm 0 for 3 steps"):
        g.after_step(3, 0.0)


def test_a_blown_up_gradient_is_stopped():
    """lr = 1e6 on the demo's random model: the loss stays near ln(V) (clipping bounds the update), the gradient
    norm before clipping reaches 1e17 by the fourth step."""
    g = guard(first=LN_V)
    g.after_step(1, 1.2)
    with pytest.raises(DivergedError, match=r"gradient norm 6\.05e\+17"):
        g.after_step(2, 6.047e17)


def test_each_check_can_be_switched_off():
    g = guard(first=2.0, lm_loss_of_uniform=None, lm_loss_factor=None, zero_grad_steps=None, grad_norm_limit=None)
    g.after_eval(2, LN_V)
    for step in range(50):
        g.after_step(step, 0.0)
    g.after_step(51, 1e20)
