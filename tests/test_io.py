"""Tests for kd.io: atomic JSON / torch writes keep the previous file on failure."""

from __future__ import annotations

import json

import pytest
import torch

from kd.io import atomic_write, save_torch_atomic, write_json_atomic


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


class TestAtomicWrite:
    def test_replaces_on_success(self, tmp_path):
        path = tmp_path / "sub" / "out.txt"
        with atomic_write(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            tmp.write_text("new")
        assert path.read_text() == "new" and _leftovers(path.parent) == []

    def test_failure_mid_write_keeps_previous(self, tmp_path):
        path = tmp_path / "out.txt"
        path.write_text("old")
        with pytest.raises(RuntimeError, match="boom"):
            with atomic_write(path) as tmp:
                tmp.write_text("half-writ")
                raise RuntimeError("boom")
        assert path.read_text() == "old" and _leftovers(tmp_path) == []


class TestJson:
    def test_round_trip(self, tmp_path):
        path = tmp_path / "metrics.json"
        write_json_atomic(path, {"AP": 12.5, "AR100": [1, 2]})
        assert json.loads(path.read_text()) == {"AP": 12.5, "AR100": [1, 2]}

    def test_unserialisable_keeps_previous(self, tmp_path):
        path = tmp_path / "metrics.json"
        write_json_atomic(path, {"AP": 1.0})
        with pytest.raises(TypeError):
            write_json_atomic(path, {"AP": object()})
        assert json.loads(path.read_text()) == {"AP": 1.0} and _leftovers(tmp_path) == []


class TestTorch:
    def test_round_trip(self, tmp_path):
        path = tmp_path / "ckpt.pt"
        state = {"w": torch.arange(4.0), "epoch": 3}
        save_torch_atomic(state, path)
        loaded = torch.load(path, weights_only=True)
        torch.testing.assert_close(loaded["w"], state["w"])
        assert loaded["epoch"] == 3

    def test_same_object_same_bytes(self, tmp_path):
        """Equal weights give equal files (DVC hashes them); torch.save(obj, path) would not."""
        state = {"w": torch.arange(4.0), "epoch": 3}
        save_torch_atomic(state, tmp_path / "a.pt")
        save_torch_atomic(state, tmp_path / "b.pt")
        assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()

    def test_failure_keeps_previous(self, tmp_path):
        path = tmp_path / "ckpt.pt"
        save_torch_atomic({"epoch": 1}, path)
        with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
            save_torch_atomic({"epoch": 2, "bad": lambda: None}, path)
        assert torch.load(path, weights_only=True) == {"epoch": 1} and _leftovers(tmp_path) == []


def test_atomic_write_gives_usual_permissions(tmp_path):
    import os

    from kd.io import write_json_atomic

    mask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
