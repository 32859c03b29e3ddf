"""Tests for kd.models.postprocess.PostProcess: top-k over queries x classes, pixel boxes."""

from __future__ import annotations

import pytest
import torch

from kd.models.postprocess import PostProcess


class TestPostProcess:
    def test_hand_built(self):
        # 1 image, 2 queries, 3 classes; scores chosen so the order is known
        probs = torch.tensor([[[0.1, 0.9, 0.3], [0.8, 0.2, 0.05]]])
        logits = torch.logit(probs)
        boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
        (res,) = PostProcess(num_select=3)(logits, boxes, torch.tensor([[100, 200]]))  # h=100, w=200
        torch.testing.assert_close(res["scores"], torch.tensor([0.9, 0.8, 0.3]))
        assert res["labels"].tolist() == [1, 0, 2] and res["labels"].dtype == torch.int64
        q0 = [80.0, 30.0, 120.0, 70.0]  # (0.4, 0.3, 0.6, 0.7) * (200, 100, 200, 100)
        q1 = [0.0, 50.0, 100.0, 100.0]
        torch.testing.assert_close(res["boxes"], torch.tensor([q0, q1, q0]))

    def test_k_is_capped_and_sizes_per_image(self):
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 3, 2, generator=gen)
        boxes = torch.full((2, 3, 4), 0.5)
        results = PostProcess(num_select=100)(logits, boxes, torch.tensor([[10, 20], [30, 40]]))
        assert len(results) == 2 and all(len(r["scores"]) == 6 for r in results)
        torch.testing.assert_close(results[1]["boxes"][0], torch.tensor([10.0, 7.5, 30.0, 22.5]))
        for b, r in enumerate(results):
            assert (r["scores"][:-1] >= r["scores"][1:]).all()
            torch.testing.assert_close(
                r["scores"].sort(descending=True).values,
                logits[b].sigmoid().flatten().sort(descending=True).values,
            )

    def test_bad_shapes_raise(self):
        with pytest.raises(ValueError, match="target_sizes"):
            PostProcess()(torch.zeros(2, 3, 2), torch.zeros(2, 3, 4), torch.zeros(3, 2))
        with pytest.raises(ValueError, match="boxes"):
            PostProcess()(torch.zeros(2, 3, 2), torch.zeros(2, 4, 4), torch.zeros(2, 2))
        with pytest.raises(ValueError, match="num_select"):
            PostProcess(num_select=0)
