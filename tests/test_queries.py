"""Tests for kd/queries.py: query picks, attention maps on the image, KD-DETR points, TAFD masks, plots."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402
from torch.testing import assert_close  # noqa: E402
from torchvision.ops import box_convert, generalized_box_iou  # noqa: E402

from kd.checkpoint import save_checkpoint  # noqa: E402
from kd.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from kd.distill.attention import query_attention_maps  # noqa: E402
from kd.models import build_model  # noqa: E402
from kd.models.matcher import HungarianMatcher  # noqa: E402
from kd.queries import (  # noqa: E402
    foreground_mass,
    general_points,
    grid_to_image,
    load_available,
    plot_points,
    plot_query_groups,
    plot_tafd_masks,
    point_queries,
    point_sets,
    query_views,
    run_one,
    sample_indices,
    select_queries,
    summary_table,
    tafd_masks,
    to_rgb,
)

torch.set_num_threads(1)
BASE = {
    "backbone": "resnet18", "strides": [8, 16, 32], "hidden_dim": 32, "nheads": 2, "enc_layers": 1,
    "dec_layers": 2, "ffn_dim": 64, "dropout": 0.0, "num_queries": 10, "num_classes": 5, "enc_points": 2,
    "dec_points": 2,
}  # fmt: skip
# (arch, extra options): the three architectures, and Deformable DETR as params.yaml sets it (two-stage)
MODELS = {
    "conditional_detr": ("conditional_detr", ()),
    "dab_detr": ("dab_detr", ()),
    "deformable_detr": ("deformable_detr", ()),
    "deformable_two_stage": ("deformable_detr", (("box_refine", True), ("two_stage", True))),
}
HW = (64, 48)


@functools.cache
def _cached(key: str) -> nn.Module:
    arch, options = MODELS[key]
    torch.manual_seed(0)
    return build_model({**BASE, "arch": arch, **dict(options)}).eval()


def _model(key: str) -> nn.Module:
    """A fresh copy of a tiny random detector (built once per configuration: ResNet init is slow)."""
    return copy.deepcopy(_cached(key))


def _sample():
    image = torch.randn(3, *HW, generator=torch.Generator().manual_seed(1))
    target = {
        "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.75, 0.3, 0.3], [0.7, 0.2, 0.2, 0.2]]),
        "labels": torch.tensor([1, 0, 3]),
        "image_id": 7,
    }
    return image, target


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------------- selection

GT = {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.8, 0.8, 0.2, 0.2]]), "labels": torch.tensor([0, 1])}
# query 0 / 6: the exact GT 0 / GT 1 with a confident class; 1-3 shifted copies of GT 0 (GIoU decreasing);
# 4, 5 far from GT 0; 7 a shifted copy of GT 1
BOXES = torch.tensor(
    [
        [0.30, 0.30, 0.20, 0.20],
        [0.32, 0.30, 0.20, 0.20],
        [0.36, 0.33, 0.20, 0.20],
        [0.40, 0.34, 0.20, 0.20],
        [0.90, 0.10, 0.10, 0.10],
        [0.60, 0.60, 0.10, 0.10],
        [0.80, 0.80, 0.20, 0.20],
        [0.78, 0.80, 0.20, 0.20],
    ]
)


def _logits() -> torch.Tensor:
    logits = torch.full((8, 3), -5.0)
    logits[0, 0] = logits[6, 1] = 5.0
    return logits


def _giou() -> torch.Tensor:
    return generalized_box_iou(
        box_convert(BOXES, "cxcywh", "xyxy"), box_convert(GT["boxes"], "cxcywh", "xyxy")
    )


class TestSelectQueries:
    def test_hand_built_case(self):
        giou = _giou()
        assert (giou[1:4, 0] > 0).all() and (giou[1:4, 0].diff() < 0).all()  # the case is what it claims
        picks = select_queries(_logits(), BOXES, GT, HungarianMatcher(), k_hard=2, k_easy=2)
        assert [p.gt for p in picks] == [0, 1]
        p0, p1 = picks
        assert p0.queries.tolist() == [0, 1, 2, 4, 5]  # positive, the 2 best hard negatives, the 2 lowest
        assert p0.kinds == ["positive", "hard", "hard", "easy", "easy"]
        assert_close(p0.giou, giou[[0, 1, 2, 4, 5], 0])
        assert giou[4, 0] < giou[5, 0]  # easy negatives by increasing GIoU
        assert p1.queries.tolist() == [6, 7, 4, 5]  # GT 1's group is query 7 only; 4, 5 lowest for GT 1
        assert giou[4, 1] < giou[5, 1]

    def test_positive_is_the_hungarian_match(self):
        matcher = HungarianMatcher()
        src, tgt = matcher(_logits(), BOXES, GT)
        picks = select_queries(_logits(), BOXES, GT, matcher)
        assert {(int(p.queries[0]), p.gt) for p in picks} == set(zip(src.tolist(), tgt.tolist(), strict=True))

    def test_tau_limits_the_hard_negatives(self):
        giou = _giou()
        tau = float((giou[1, 0] + giou[2, 0]) / 2)  # only query 1 is above it
        picks = select_queries(_logits(), BOXES, GT, HungarianMatcher(), k_hard=3, k_easy=1, tau=tau)
        assert picks[0].queries.tolist() == [0, 1, 4]
        assert picks[0].kinds == ["positive", "hard", "easy"]

    def test_every_non_positive_hard_falls_back_for_easy(self):
        picks = select_queries(_logits(), BOXES, GT, HungarianMatcher(), k_hard=1, k_easy=1, tau=-1.0)
        assert picks[0].queries.tolist() == [0, 1, 7]  # 7: lowest GIoU with GT 0 among all non-positives
        assert _giou()[7, 0] < _giou()[[1, 2, 3, 4, 5], 0].min()

    def test_limits_and_no_gt(self):
        picks = select_queries(_logits(), BOXES, GT, HungarianMatcher(), k_hard=0, k_easy=0, max_gt=1)
        assert len(picks) == 1 and picks[0].queries.tolist() == [0]
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        assert select_queries(_logits(), BOXES, empty, HungarianMatcher()) == []
        with pytest.raises(ValueError, match="k_hard"):
            select_queries(_logits(), BOXES, GT, HungarianMatcher(), k_hard=-1)


# ---------------------------------------------------------------------------- attention


def _grid_out(shapes: list[tuple[int, int]], valid: list[tuple[int, int]] | None = None) -> SimpleNamespace:
    """The two fields of a DetectorOutput that grid_to_image reads."""
    masks = []
    for (h, w), (vh, vw) in zip(shapes, valid or shapes, strict=True):
        m = torch.ones(1, h, w, dtype=torch.bool)
        m[0, :vh, :vw] = False
        masks.append(m)
    return SimpleNamespace(spatial_shapes=torch.tensor(shapes), feature_masks=masks)


class TestGridToImage:
    def test_mass_kept_and_placed(self):
        tokens = torch.zeros(2, 4 + 1)  # level 0: 2 x 2, level 1: 1 x 1
        tokens[0, 3] = 0.7  # bottom-right cell of level 0
        tokens[0, 4] = 0.2
        tokens[1, 0] = 1.0  # top-left cell
        maps = grid_to_image(tokens, _grid_out([(2, 2), (1, 1)]), (8, 6))
        assert maps.shape == (2, 8, 6) and (maps >= 0).all()
        assert_close(maps.sum((1, 2)), torch.tensor([0.9, 1.0]))
        assert maps[1, :4, :3].sum() > 0.5 and maps[1, 4:, 3:].sum() < 0.1
        assert_close(maps[0, :4, :3].sum(), torch.tensor(0.2 / 4), atol=0.03, rtol=0)

    def test_padded_cells_dropped(self):
        tokens = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])  # 2 x 3 grid, last column padded
        tokens[0, 2] = 0.25
        maps = grid_to_image(tokens, _grid_out([(2, 3)], [(2, 2)]), (4, 4))
        assert_close(maps.sum(), torch.tensor(1.0))
        assert_close(maps[0, 3].sum(), torch.tensor(0.0))  # the image's last row samples the empty grid row
        assert maps[0, :2].sum() > 0.75

    def test_foreground_mass(self):
        maps = torch.zeros(2, 4, 4)
        maps[0, :2, :2] = 1.0  # top-left quadrant
        maps[1] = 1.0 / 16
        box = torch.tensor([0.25, 0.25, 0.5, 0.5])  # the top-left quadrant
        assert_close(foreground_mass(maps, box), torch.tensor([1.0, 0.25]))


@pytest.mark.parametrize("key", list(MODELS))
class TestModels:
    def test_attention_maps_and_views(self, key):
        model = _model(key)
        image, target = _sample()
        out = run_one(model, image)
        views = query_views(out, target, HungarianMatcher(), HW, k_hard=2, k_easy=2, tau=-1.0, max_gt=2)
        assert [v.picks.gt for v in views] == [0, 1]
        for v in views:
            k = len(v.picks.queries)
            assert v.picks.kinds[0] == "positive" and v.picks.kinds.count("easy") == 2 and 3 <= k <= 5
            assert v.maps.shape == (k, *HW) and (v.maps >= 0).all()
            assert v.boxes.shape == (k, 4) and v.scores.shape == (k,)
            assert ((v.foreground >= 0) & (v.foreground <= 1 + 1e-6)).all()
            mass = v.maps.sum((1, 2))
            if out.detection.cross_attn is not None:  # dense: a softmax over the tokens
                assert_close(mass, torch.ones(k), atol=1e-4, rtol=0)
            else:  # deformable: the sampling mass that falls inside the grid
                tokens = query_attention_maps(out.detection, -1, out.spatial_shapes)[0, v.picks.queries]
                assert_close(mass, tokens.sum(-1), atol=1e-4, rtol=1e-4)
                assert (mass > 0.3).all() and (mass <= 1 + 1e-5).all()
        fig = plot_query_groups(image, target["boxes"][0], {"a": views[0], "b": views[1], "c": None}, "t")
        cols = max(len(views[0].picks.queries), len(views[1].picks.queries))
        assert isinstance(fig, Figure) and len(fig.axes) == 3 * cols

    def test_points_and_tafd(self, key):
        model = _model(key)
        image, target = _sample()
        out = run_one(model, image, point_queries(model, 6, "normal", seed=3))
        sets = point_sets(out)
        assert set(sets) == {"general", "specific"}
        assert sets["general"].boxes.shape == (6, 4)
        assert sets["specific"].boxes.shape == (BASE["num_queries"], 4)
        for ps in sets.values():
            assert ps.references.shape[-1] in (2, 4)
            assert ((ps.scores >= 0) & (ps.scores <= 1)).all()
            assert ((ps.references >= 0) & (ps.references <= 1)).all()
        if key == "dab_detr":  # box queries: the general points enter as their anchors
            assert_close(sets["general"].references, general_points(model, 6, "normal", 3)[0].sigmoid())
        masks = tafd_masks(out, target, topk=8)
        assert len(masks) == len(out.features)
        for m, f in zip(masks, out.features, strict=True):
            assert m.shape == f.shape[-2:]
            assert (m > 0).all() and (m <= 1).all()
            assert_close(m.max(), torch.tensor(1.0))
        assert isinstance(plot_points([image, image], [sets, sets], [target["boxes"]] * 2), Figure)
        assert isinstance(plot_tafd_masks([image], [masks], [target["boxes"]]), Figure)


def test_general_points_seeded_and_rng_untouched():
    model = _model("dab_detr")
    state = torch.get_rng_state()
    a = general_points(model, 5, "uniform", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(a, general_points(model, 5, "uniform", seed=1))
    assert a.shape == (1, 5, 4)
    embed = general_points(_model("conditional_detr"), 5, "normal", seed=1)
    assert embed.shape == (1, 5, BASE["hidden_dim"])


# ---------------------------------------------------------------------------- helpers


def test_load_available(tmp_path):
    params = {"model": {**BASE, "arch": "dab_detr"}, "teacher": {"model": {}}, "student": {"model": {}}}
    model = _model("dab_detr")
    save_checkpoint(tmp_path / "t.pt", model)
    models, skipped = load_available(
        params, {"teacher": ("teacher", tmp_path / "t.pt"), "student x": ("student", tmp_path / "none.pt")}
    )
    assert list(models) == ["teacher"] and len(skipped) == 1 and "student x" in skipped[0]
    loaded = models["teacher"]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert_close(loaded.state_dict()[k], v)


class _FakeDataset:
    ids = [10, 11, 12, 13, 14]
    counts = {10: 0, 11: 2, 12: 0, 13: 1, 14: 3}  # boxes per image

    def __len__(self) -> int:
        return len(self.ids)

    def load_target(self, image_id: int) -> dict:
        return {"boxes": torch.zeros(self.counts[image_id], 4)}


def test_sample_indices():
    assert sample_indices(_FakeDataset(), 2) == [1, 3]
    assert sample_indices(_FakeDataset(), 9) == [1, 3, 4]


def test_to_rgb_undoes_the_normalisation():
    rgb = torch.rand(3, 4, 5)
    norm = (rgb - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert_close(torch.from_numpy(to_rgb(norm)), rgb.permute(1, 2, 0))


def test_summary_table():
    image, target = _sample()
    out = run_one(_model("conditional_detr"), image)
    views = query_views(out, target, HungarianMatcher(), HW, k_hard=1, k_easy=2, tau=-1.0)
    table = summary_table({"m": [views, views]})
    assert list(table.index) == ["m"]
    assert table[("queries", "positive")]["m"] == 2 * 3
    assert table[("queries", "easy")]["m"] == 2 * 3 * 2
    easy = [v.foreground[torch.tensor([k == "easy" for k in v.picks.kinds])] for v in views]
    expected = torch.cat(easy).mean()
    assert_close(
        torch.tensor(table[("in-box attention", "easy")]["m"]), expected.double(), rtol=1e-5, atol=1e-6
    )
