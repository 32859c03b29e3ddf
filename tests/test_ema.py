"""Tests for kd/ema.py and its use by kd.engine.fit: the average's arithmetic, what it skips, resume."""

import math

import pytest
import torch
from test_engine import assert_same_weights, run_fit
from torch import nn

from kd.checkpoint import load_checkpoint
from kd.ema import ModelEMA


def test_decay_ramp_and_constant():
    ramped, flat = ModelEMA(nn.Linear(2, 2), 0.99, tau=100), ModelEMA(nn.Linear(2, 2), 0.99)
    assert ramped.decay_at(1) == pytest.approx(0.99 * (1 - math.exp(-0.01)))
    assert ramped.decay_at(100) == pytest.approx(0.99 * (1 - math.exp(-1)))
    assert ramped.decay_at(10_000) == pytest.approx(0.99, abs=1e-12)
    assert flat.decay_at(1) == flat.decay_at(500) == 0.99


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5])
def test_bad_decay_is_an_error(bad):
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(nn.Linear(2, 2), bad)


def test_update_is_the_ramped_lerp_of_trainable_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen: copied at creation, never averaged
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # an "optimizer step" (even on the frozen layer)
        model.train()(torch.randn(5, 3))  # moves the batch-norm statistics and its integer counter
        ema.update(model)
        d = 0.9 * (1 - math.exp(-t / 2.0))
        for k, v in model.state_dict().items():
            if k.startswith("0."):
                continue  # frozen
            elif v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
            else:
                expected[k] = v.clone()
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, msg=k)
    assert int(got["1.num_batches_tracked"]) == 3 and int(ema.updates) == 3
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_does_not_change_training_and_is_what_best_holds(tmp_path):
    plain = run_fit(tmp_path / "plain", epochs=2)
    averaged = run_fit(tmp_path / "ema", epochs=2, ema_decay=0.5, ema_tau=1.0)
    assert_same_weights(plain.state_dict(), averaged.state_dict())  # same trajectory
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    best = load_checkpoint(tmp_path / "ema" / "best.pt")
    assert_same_weights(last["model"], averaged.state_dict())  # raw weights, for resuming
    ema_weights = {k[len("module.") :]: v for k, v in last["ema"].items() if k.startswith("module.")}
    if best["epoch"] == last["epoch"]:
        assert_same_weights(best["model"], ema_weights)
    assert not torch.equal(ema_weights["cls.weight"], averaged.cls.weight)
    assert load_checkpoint(tmp_path / "plain" / "last.pt")["ema"] is None
    assert (tmp_path / "plain/plots/train.tsv").read_text() == (tmp_path / "ema/plots/train.tsv").read_text()
    assert (tmp_path / "plain/plots/val.tsv").read_text() != (tmp_path / "ema/plots/val.tsv").read_text()


def test_resume_with_ema_is_bitwise_identical(tmp_path):
    run_fit(tmp_path / "a", epochs=2, ema_decay=0.5, ema_tau=1.0)
    run_fit(tmp_path / "b", epochs=1, ema_decay=0.5, ema_tau=1.0)
    torch.manual_seed(123)
    run_fit(tmp_path / "b", epochs=2, ema_decay=0.5, ema_tau=1.0)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert_same_weights(a["ema"], b["ema"])
    assert int(a["ema"]["updates"]) == 8
    assert (tmp_path / "a/metrics.json").read_text() == (tmp_path / "b/metrics.json").read_text()
