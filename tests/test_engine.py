"""Tests for kd/engine.py: optimizer groups, schedule, resume continuity, determinism, non-finite loss."""

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from tiny_detector import FakeDetection, TinyDetector, coco_gt, collate, tiny_loss
from torch.utils.data import DataLoader

from kd.checkpoint import load_checkpoint
from kd.config import TrainConfig
from kd.engine import (
    EpochSampler,
    NonFiniteLossError,
    ShardSampler,
    autocast,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    resolve_amp,
    seed_everything,
    settings_diff,
    train_one_epoch,
    upsert_tsv,
)

CPU = torch.device("cpu")


def make_cfg(epochs: int = 2, seed: int = 0, **kw) -> TrainConfig:
    base = dict(
        epochs=epochs,
        batch_size=2,
        lr=1e-2,
        lr_backbone=1e-3,
        warmup_iters=3,
        lr_drop=1,
        clip_max_norm=0.5,
        log_every=1000,
        seed=seed,
    )
    return TrainConfig(**{**base, **kw})


def val_ap(model: torch.nn.Module) -> dict[str, float]:
    """A deterministic stand-in for COCO evaluation: higher when the loss on fixed data is lower."""
    data = FakeDetection(4, seed=1)
    images, mask, targets = collate(
        [(data.images[i], {"boxes": data.boxes[i], "labels": data.labels[i]}) for i in range(4)]
    )
    model.eval()
    with torch.no_grad():
        loss = sum(tiny_loss(model, images, mask, targets).values())
    model.train()
    return {"AP": float(100 - loss), "AP50": float(100 - loss / 2)}


def run_fit(out_dir, epochs: int, seed: int = 0, loss_fn=tiny_loss, **kw):
    """Build everything from scratch (as a new process would) and fit; returns the model."""
    cfg = make_cfg(epochs, seed, **kw)
    seed_everything(cfg.seed)
    model = TinyDetector()
    data = FakeDetection(8)
    loader = DataLoader(
        data,
        batch_size=2,
        sampler=EpochSampler(len(data), cfg.seed),
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator(),
    )
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, len(loader))
    fit(
        model,
        loss_fn,
        loader,
        opt,
        sched,
        cfg,
        out_dir,
        device=CPU,
        evaluate_fn=val_ap,
        model_config={"arch": "tiny"},
    )
    return model


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class TestOptimizer:
    def test_param_groups_by_name(self):
        model = TinyDetector()
        opt = build_optimizer(model, make_cfg())
        groups = {g["name"]: g for g in opt.param_groups}
        assert groups["backbone"]["lr"] == pytest.approx(1e-3)
        assert groups["linear_proj"]["lr"] == pytest.approx(1e-3)  # lr * 0.1
        assert groups["main"]["lr"] == pytest.approx(1e-2)
        assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
        assert {id(p) for p in groups["linear_proj"]["params"]} == {
            id(p) for p in model.sampling_offsets.parameters()
        }
        n_all = sum(len(g["params"]) for g in opt.param_groups)
        assert n_all == len(list(model.parameters()))

    def test_extra_module_params_join_once(self):
        model = TinyDetector()
        extra = torch.nn.ModuleDict({"student": model, "adapter": torch.nn.Linear(8, 8)})  # shares the model
        opt = build_optimizer(model, make_cfg(), extra=extra)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(model.parameters())) + 2
        assert id(extra["adapter"].weight) in {
            id(p) for g in opt.param_groups if g["name"] == "main" for p in g["params"]
        }

    def test_frozen_params_skipped(self):
        model = TinyDetector()
        model.backbone.requires_grad_(False)
        names = [g["name"] for g in build_optimizer(model, make_cfg()).param_groups]
        assert "backbone" not in names

    def test_warmup_then_drop_and_state_roundtrip(self):
        model = TinyDetector()
        cfg = make_cfg(lr_drop=2, warmup_iters=4)
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, iters_per_epoch=5)
        lrs = []
        for _ in range(12):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        torch.testing.assert_close(lrs[:5], [1e-2 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])
        assert lrs[9] == pytest.approx(1e-2) and lrs[10] == pytest.approx(1e-3)
        opt2 = build_optimizer(TinyDetector(), cfg)
        sched2 = build_scheduler(opt2, cfg, iters_per_epoch=5)
        sched2.load_state_dict(sched.state_dict())
        assert sched2.last_epoch == 12 and sched2.get_last_lr() == sched.get_last_lr()

    def test_cosine_warms_up_then_decays_to_the_floor_at_the_last_step(self):
        model = TinyDetector()
        cfg = make_cfg(epochs=3, lr_drop=None, warmup_iters=2, lr_schedule="cosine", lr_min_ratio=0.1)
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, iters_per_epoch=6)  # 18 steps: 2 warm-up, a 16-step cosine
        lrs = []
        for _ in range(20):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[:3] == pytest.approx([5e-3, 1e-2, 1e-2])
        assert lrs[10] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # half way through the cosine
        assert lrs[18] == pytest.approx(1e-3) and lrs[19] == pytest.approx(1e-3)  # floor, and it stays
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
        backbone = [g for g in opt.param_groups if g["name"] == "backbone"][0]
        assert backbone["lr"] == pytest.approx(1e-3 * 0.1)  # every group follows the same factor


def test_epoch_sampler_depends_on_seed_and_epoch_only():
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    first = list(s)
    torch.manual_seed(99)  # the global RNG must not matter
    assert list(s) == first
    s.set_epoch(2)
    assert list(s) != first and sorted(s) == list(range(10))
    assert [list(ShardSampler(5, r, 2)) for r in (0, 1)] == [[0, 2, 4], [1, 3]]


def test_resume_is_bitwise_identical(tmp_path):
    straight = run_fit(tmp_path / "a", epochs=2)
    run_fit(tmp_path / "b", epochs=1)  # "interrupted" after epoch 0
    torch.manual_seed(12345)  # a fresh process would start from another RNG state
    resumed = run_fit(tmp_path / "b", epochs=2)
    assert_same_weights(straight.state_dict(), resumed.state_dict())
    ckpt_a, ckpt_b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt_a["epoch"] == ckpt_b["epoch"] == 1 and ckpt_a["step"] == ckpt_b["step"] == 8
    assert_same_weights(ckpt_a["optimizer"]["state"][0], ckpt_b["optimizer"]["state"][0])
    for name in ("metrics.json", "plots/train.tsv", "plots/val.tsv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    a = run_fit(tmp_path / "a", epochs=1, seed=5)
    b = run_fit(tmp_path / "b", epochs=1, seed=5)
    c = run_fit(tmp_path / "c", epochs=1, seed=6)
    assert (tmp_path / "a/metrics.json").read_text() == (tmp_path / "b/metrics.json").read_text()
    assert_same_weights(a.state_dict(), b.state_dict())
    assert not torch.equal(a.cls.weight, c.cls.weight)


def test_outputs_written(tmp_path):
    run_fit(tmp_path, epochs=2)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["epochs"] == 2 and summary["step"] == 8
    assert set(summary["val"]) >= {"epoch", "AP", "AP50"} and summary["best"]["epoch"] in (0, 1)
    with open(tmp_path / "plots/train.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"step", "loss", "loss_cls", "loss_bbox", "lr"} <= set(rows[0])
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == summary["best"]["epoch"] and best["config"] == {"arch": "tiny"}
    assert not list(tmp_path.glob(".*.tmp"))


class NaNAt:
    """tiny_loss, except that ``loss_bbox`` is NaN from the ``at``-th call on."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, model, images, mask, targets):
        self.calls += 1
        losses = tiny_loss(model, images, mask, targets)
        if self.calls >= self.at:
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    good = run_fit(tmp_path / "good", epochs=1)
    with pytest.raises(NonFiniteLossError, match="loss_bbox at epoch 1"):
        run_fit(tmp_path / "bad", epochs=3, loss_fn=NaNAt(6))  # 4 iterations per epoch: NaN in epoch 1
    ckpt = load_checkpoint(tmp_path / "bad" / "last.pt")
    assert ckpt["epoch"] == 0
    assert_same_weights(ckpt["model"], good.state_dict())


def test_upsert_tsv_drops_rows_of_later_epochs(tmp_path):
    path = tmp_path / "t.tsv"
    for e in range(3):
        upsert_tsv(path, {"epoch": e, "loss": 1.0 / (e + 1)})
    upsert_tsv(path, {"epoch": 1, "loss": 0.25, "lr": 1e-4})  # a resumed run redoing epoch 1
    lines = path.read_text().splitlines()
    assert lines == ["epoch\tloss\tlr", "0\t1\t", "1\t0.25\t0.0001"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_on_cpu_trains(amp):
    seed_everything(0)
    model = TinyDetector()
    cfg = make_cfg(amp=amp)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    loader = DataLoader(FakeDetection(4), batch_size=2, collate_fn=collate)
    opt = build_optimizer(model, cfg)
    before = model.cls.weight.detach().clone()
    stats, step = train_one_epoch(
        model,
        tiny_loss,
        loader,
        opt,
        build_scheduler(opt, cfg, 2),
        device=CPU,
        epoch=0,
        step=0,
        amp=amp,
        scaler=scaler,
        clip_max_norm=0.1,
    )
    assert step == 2 and torch.isfinite(torch.tensor(stats["loss"]))
    assert not torch.equal(before, model.cls.weight)


@pytest.mark.parametrize(("flags", "expected"), [(["avx512_bf16", "amx_bf16"], "bf16"), ([], "none")])
def test_amp_auto_follows_the_cpus_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.setattr("kd.engine.cpu_bf16_flags", lambda: flags)
    assert resolve_amp("auto", CPU) == expected
    for amp in ("none", "bf16", "fp16"):
        assert resolve_amp(amp, CPU) == amp  # explicit modes are never second-guessed
    assert resolve_amp("auto", torch.device("meta")) == "none"
    x = torch.ones(2, 2)
    with autocast(CPU, "auto"):
        y = x @ x
    assert y.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


class Oracle(torch.nn.Module):
    """Replays the ground truth of FakeDetection batch by batch: query 0 is the right box and class."""

    def __init__(self, data: FakeDetection, batch_size: int):
        super().__init__()
        self.data, self.batch_size, self.calls = data, batch_size, 0

    def forward(self, images, mask, targets=None):
        idx = slice(self.calls * self.batch_size, (self.calls + 1) * self.batch_size)
        self.calls += 1
        b = images.shape[0]
        logits = torch.full((b, 4, 3), -10.0)
        logits[torch.arange(b), 0, self.data.labels[idx, 0]] = 10.0
        boxes = torch.full((b, 4, 4), 0.1)
        boxes[:, 0] = self.data.boxes[idx, 0]
        return SimpleNamespace(logits=logits, boxes=boxes)


def test_evaluate_with_coco_evaluator():
    from kd.evaluation import CocoEvaluator
    from kd.models.postprocess import PostProcess

    data = FakeDetection(4, augment=False)
    loader = DataLoader(data, batch_size=2, collate_fn=collate)
    perfect = evaluate(
        Oracle(data, 2), loader, PostProcess(10), CocoEvaluator(coco_gt(data), [1, 2, 3]), device=CPU
    )
    assert perfect["AP"] == pytest.approx(100.0) and perfect["AP50"] == pytest.approx(100.0)
    first_half = evaluate(
        Oracle(data, 2),
        loader,
        PostProcess(10),
        CocoEvaluator(coco_gt(data), [1, 2, 3]),
        device=CPU,
        max_iters=1,
    )  # only the evaluated images count
    assert first_half["AP"] == pytest.approx(100.0)
    random = evaluate(
        TinyDetector(), loader, PostProcess(10), CocoEvaluator(coco_gt(data), [1, 2, 3]), device=CPU
    )
    assert random["AP"] < 50


def test_settings_diff_names_every_changed_leaf():
    old = {"model": {"width": 64, "strides": [16, 32]}, "train": {"lr": 5e-4}, "gone": 1}
    new = {"model": {"width": 64, "strides": [8, 16, 32]}, "train": {"lr": 1e-3}, "added": True}
    assert settings_diff(old, new) == [
        "added: <unset> -> True",
        "gone: 1 -> <unset>",
        "model.strides: [16, 32] -> [8, 16, 32]",
        "train.lr: 0.0005 -> 0.001",
    ]
    assert settings_diff(new, new) == [] and settings_diff({}, {}) == []
