"""Fixtures shared by the test files."""
import pytest

import grpo


@pytest.fixture
def non_finite_loss(monkeypatch):
    """grpo.grpo_loss returning NaN (its statistics unchanged): what a bad learning rate or dtype produces."""
    loss_fn = grpo.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, stats = loss_fn(*args, **kwargs)
        return loss * float("nan"), stats
    monkeypatch.setattr(grpo, "grpo_loss", nan_loss)
