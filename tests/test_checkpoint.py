"""Tests for kd/checkpoint.py: round trip, RNG restore, atomic save, corrupt / foreign / malicious files."""

import pathlib
import random

import numpy as np
import pytest
import torch
from tiny_detector import TinyDetector
from torch import nn

from kd.checkpoint import (
    CHECKPOINT_KEYS,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_holds_every_part(tmp_path):
    model = TinyDetector()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    path = save_checkpoint(
        tmp_path / "c.pt",
        model,
        optimizer=opt,
        scheduler=sched,
        epoch=4,
        step=40,
        config={"arch": "tiny"},
        metrics={"AP": 1.5},
    )
    ckpt = load_checkpoint(path)
    assert set(ckpt) == set(CHECKPOINT_KEYS)
    assert (ckpt["epoch"], ckpt["step"], ckpt["config"], ckpt["metrics"]) == (
        4,
        40,
        {"arch": "tiny"},
        {"AP": 1.5},
    )
    other = TinyDetector()
    load_model_state(other, ckpt["model"], path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)


def test_rng_state_restores_all_generators():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
    np.testing.assert_array_equal(again[1], first[1])
    assert again[2] == first[2]


def test_crash_during_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, TinyDetector(), epoch=1)

    def crash(obj, f, *args, **kwargs):  # kd.io saves through an open file object
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("simulated crash during torch.save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, TinyDetector(), epoch=2)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_value_error_naming_it(tmp_path, damage):
    path = tmp_path / "broken.pt"
    save_checkpoint(path, TinyDetector())
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=r"broken\.pt.*(truncated|corrupt)"):
        load_checkpoint(path)


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: not a kd checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


class Payload:
    """Unpickling this object creates ``marker``: it stands for arbitrary code execution."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: an unsafe load does run the payload
    assert marker.exists()


def test_other_class_count_names_shape_mismatch(tmp_path):
    path = save_checkpoint(tmp_path / "c5.pt", TinyDetector(num_classes=5))
    with pytest.raises(
        ValueError, match=r"c5\.pt: .*shape mismatch 2: cls\.weight \(5, 8\) vs \(3, 8\), cls\.bias"
    ):
        load_model_state(TinyDetector(num_classes=3), load_checkpoint(path)["model"], path)


def test_other_architecture_names_missing_and_unexpected_keys(tmp_path):
    other = nn.Sequential(nn.Linear(2, 2))
    path = save_checkpoint(tmp_path / "seq.pt", other)
    with pytest.raises(
        ValueError,
        match=r"seq\.pt: checkpoint does not fit TinyDetector: missing 9: backbone\.weight"
        r".*\(\+6 more\); unexpected 2: 0\.weight, 0\.bias",
    ):
        load_model_state(TinyDetector(), load_checkpoint(path)["model"], path)
