"""Tests for kd.models.convert: HF transformers detectors and official checkpoints as kd detectors."""

from __future__ import annotations

import argparse
import functools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kd.models import build_model
from kd.models.convert import (
    HF_DEFORMABLE_DECODER,
    config_from_hf,
    from_hf,
    from_official,
    hf_state_to_kd,
    official_state_dict,
    rename_key,
    select_classes,
)

transformers = pytest.importorskip("transformers")

HF_CASES = {
    "conditional": ("ConditionalDetr", {}),
    "dab": ("DabDetr", {"num_patterns": 2}),
    "deformable": ("DeformableDetr", {}),
    "deformable_refine": ("DeformableDetr", {"with_box_refine": True}),
    "deformable_two_stage": ("DeformableDetr", {"with_box_refine": True, "two_stage": True}),
}


def _resnet18_config(deformable: bool):
    """A HF ResNet with torchvision ResNet-18's layout (no download, random init)."""
    return transformers.ResNetConfig(
        depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"] if deformable else ["stage4"],
    )  # fmt: skip


@functools.cache
def _hf_model(case: str) -> nn.Module:
    """A tiny random HF detector with every weight and frozen-BN statistic perturbed (so that a wrong
    mapping changes the outputs)."""
    prefix, options = HF_CASES[case]
    deformable = prefix == "DeformableDetr"
    kw = dict(
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5, dropout=0.0,
        backbone_config=_resnet18_config(deformable), use_pretrained_backbone=False, **options,
    )  # fmt: skip
    kw["hidden_size" if prefix == "DabDetr" else "d_model"] = 32
    if deformable:
        kw.update(num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, two_stage_num_proposals=10)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForObjectDetection")(
        getattr(transformers, f"{prefix}Config")(**kw)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("normalization.weight"):  # keep the random ResNet's activations bounded
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.25)
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes (64x48 and 40x64) padded to 64x64; mask True on padding."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, :, 48:] = True
    mask[1, 40:] = True
    return images.masked_fill(mask[:, None], 0.0), mask


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HF_CASES))
def test_from_hf_matches_hf_outputs(case):
    hf = _hf_model(case)
    ours = from_hf(hf)
    images, mask = _batch()
    with torch.no_grad():
        want = hf(pixel_values=images, pixel_mask=(~mask).long())
        got = ours(images, mask)
    # two-stage: equal only while HF's top-k picks no padded proposal (kd never does); true for this seed
    assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
    assert_close(got.boxes, want.pred_boxes, rtol=0, atol=1e-4)
    assert not ours.training and type(ours).__name__.lower().startswith(case.split("_")[0][:3])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(HF_CASES))
def test_from_hf_reads_a_save_pretrained_directory(case, tmp_path):
    """save_pretrained writes legacy names and omits tied weights; the directory gives the same model."""
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    from_dir, from_object = from_hf(tmp_path).state_dict(), from_hf(hf).state_dict()
    assert from_dir.keys() == from_object.keys()
    for key, value in from_object.items():
        assert_close(from_dir[key], value, rtol=0, atol=0, msg=key)


def test_from_hf_rejects_models_without_heads(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        from_hf(tmp_path)
    cfg = transformers.ConditionalDetrConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, backbone_config=_resnet18_config(False),
        use_pretrained_backbone=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="ForObjectDetection"):
        from_hf(transformers.ConditionalDetrModel(cfg))


def test_config_from_hf_deformable_two_stage():
    cfg = config_from_hf(_hf_model("deformable_two_stage").config.to_dict())
    assert cfg["arch"] == "deformable_detr" and cfg["backbone"] == "resnet18"
    assert cfg["strides"] == [8, 16, 32] and cfg["extra_levels"] == 1
    assert (cfg["hidden_dim"], cfg["nheads"], cfg["enc_layers"], cfg["dec_layers"], cfg["ffn_dim"]) == (
        32, 2, 2, 2, 64,
    )  # fmt: skip
    assert cfg["two_stage"] and cfg["box_refine"] and cfg["dn_groups"] == 0
    assert (cfg["num_queries"], cfg["num_classes"], cfg["enc_points"]) == (10, 5, 2)
    assert cfg["backbone_norm"] == "frozen_bn"


def test_config_from_hf_legacy_timm_and_bottleneck_backbones():
    """Hub configs name a timm ResNet (torchvision layout); a bottleneck HF ResNet [3,4,6,3] is ResNet-50."""
    legacy = {
        "model_type": "deformable_detr", "backbone": "resnet50", "use_timm_backbone": True,
        "backbone_config": None, "num_feature_levels": 4, "d_model": 256, "encoder_attention_heads": 8,
        "decoder_attention_heads": 8, "encoder_layers": 6, "decoder_layers": 6, "encoder_ffn_dim": 1024,
        "decoder_ffn_dim": 1024, "num_queries": 300, "id2label": {str(i): str(i) for i in range(91)},
    }  # fmt: skip
    cfg = config_from_hf(legacy)
    assert (cfg["backbone"], cfg["strides"], cfg["extra_levels"], cfg["num_classes"]) == (
        "resnet50", [8, 16, 32], 1, 91,
    )  # fmt: skip
    single = config_from_hf({**legacy, "model_type": "conditional_detr", "num_feature_levels": None})
    assert single["strides"] == [32] and "extra_levels" not in single
    r50 = transformers.ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage4"],
    )
    assert config_from_hf({**legacy, "backbone_config": r50.to_dict()})["backbone"] == "resnet50"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "detr"}, "model_type"),
        ({"backbone_config": {"model_type": "resnet", "layer_type": "basic", "depths": [1, 1, 1, 1],
                              "hidden_sizes": [64, 128, 256, 512]}}, "torchvision"),
        ({"dilation": True}, "dilation"),
        ({"keep_query_pos": True, "model_type": "dab-detr"}, "keep_query_pos"),
        ({"decoder_attention_heads": 4}, "decoder_attention_heads"),
    ],
)  # fmt: skip
def test_config_from_hf_rejects_what_kd_does_not_implement(change, match):
    config = {**_hf_model("conditional").config.to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        config_from_hf(config)


def test_rename_key_packs_qkv_only_for_multihead_attention():
    assert rename_key("layers.1.self_attn.k_proj.bias", HF_DEFORMABLE_DECODER) == (
        "layers.1.self_attn.in_proj_bias", 1,
    )  # fmt: skip
    assert rename_key("layers.0.encoder_attn.value_proj.weight", HF_DEFORMABLE_DECODER) == (
        "layers.0.cross_attn.value_proj.weight", None,
    )  # fmt: skip


def test_hf_backbone_keys_map_to_torchvision_names():
    """HF ResNet (bottleneck layers, shortcut, stem) and timm ResNet keys, legacy prefixes included."""
    stem, hf_stage = "model.backbone.conv_encoder.model.", "model.backbone.conv_encoder.model.encoder.stages."
    expected = {
        stem + "_backbone.layer1.0.conv3.weight": "backbone.body.layer1.0.conv3.weight",  # timm
        hf_stage + "1.layers.0.layer.2.normalization.running_var": "backbone.body.layer2.0.bn3.running_var",
        hf_stage + "3.layers.0.shortcut.convolution.weight": "backbone.body.layer4.0.downsample.0.weight",
        stem + "embedder.embedder.normalization.bias": "backbone.body.bn1.bias",
    }
    state = {k: torch.zeros(1) for k in [*expected, stem + "_backbone.bn1.num_batches_tracked"]}
    assert sorted(hf_state_to_kd(state, "dab_detr", expected.values())) == sorted(expected.values())


# --- official repositories' checkpoints ------------------------------------------------------------------

_TINY = {
    "backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2, "ffn_dim": 64,
    "dropout": 0.0, "num_queries": 10, "num_classes": 5,
}  # fmt: skip
OFFICIAL = {
    "conditional_detr": {**_TINY, "strides": [32]},
    "dab_detr": {**_TINY, "strides": [32], "num_patterns": 2},
    "deformable_detr": {
        **_TINY, "strides": [8, 16, 32], "extra_levels": 1, "enc_points": 2, "dec_points": 2,
        "two_stage": True, "box_refine": True, "dn_groups": 0,
    },
}  # fmt: skip
# keys that exist only in the official layout (checked against the official repositories' module names)
OFFICIAL_KEYS = {
    "conditional_detr": [
        "backbone.0.body.layer4.1.bn2.running_var", "query_embed.weight",
        "transformer.decoder.layers.0.ca_qpos_proj.weight",
        "transformer.encoder.layers.0.self_attn.in_proj_weight",
    ],
    "dab_detr": [
        "backbone.0.body.conv1.weight", "refpoint_embed.weight", "transformer.patterns.weight",
        "transformer.decoder.bbox_embed.layers.2.bias", "transformer.decoder.ref_anchor_head.layers.0.weight",
        "transformer.encoder.layers.0.activation.weight",
    ],
    "deformable_detr": [
        "backbone.0.body.layer2.0.downsample.1.weight", "transformer.level_embed", "input_proj.3.1.bias",
        "transformer.decoder.class_embed.2.weight", "transformer.decoder.bbox_embed.1.layers.0.weight",
        "transformer.enc_output_norm.weight",
        "transformer.decoder.layers.1.cross_attn.sampling_offsets.weight",
    ],
}  # fmt: skip


def _official_checkpoint(arch: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = build_model({**OFFICIAL[arch], "arch": arch, "backbone_norm": "frozen_bn"}).eval()
    with torch.no_grad():  # move the zero-initialised heads away from their init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, {
        "model": official_state_dict(model, arch),
        "epoch": 49,
        "args": argparse.Namespace(lr=1e-4),
    }


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_from_official_round_trip(arch, tmp_path):
    model, ckpt = _official_checkpoint(arch)
    assert set(OFFICIAL_KEYS[arch]) <= ckpt["model"].keys()
    assert not any(k.startswith("backbone.body.") for k in ckpt["model"])
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    loaded = from_official(tmp_path / "checkpoint.pth", arch, OFFICIAL[arch])
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    images, mask = _batch()
    with torch.no_grad():
        want, got = model(images, mask), loaded(images, mask)
    assert_close(got.logits, want.logits)
    assert_close(got.boxes, want.boxes)


def test_from_official_wrong_architecture_is_named():
    _, ckpt = _official_checkpoint("conditional_detr")
    with pytest.raises(ValueError, match="conditional_detr checkpoint, not dab_detr"):
        from_official(ckpt["model"], "dab_detr", OFFICIAL["dab_detr"])


def test_from_official_mismatch_names_the_keys():
    _, ckpt = _official_checkpoint("conditional_detr")
    with pytest.raises(ValueError, match=r"shape mismatch 2: class_embed\.weight"):
        from_official(ckpt, "conditional_detr", {**OFFICIAL["conditional_detr"], "num_classes": 7})
    del ckpt["model"]["transformer.decoder.norm.weight"]
    with pytest.raises(ValueError, match=r"missing 1: transformer\.decoder\.norm\.weight"):
        from_official(ckpt, "conditional_detr", OFFICIAL["conditional_detr"])


def test_from_official_bad_file(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        from_official(tmp_path / "missing.pth", "dab_detr", OFFICIAL["dab_detr"])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        from_official(tmp_path / "junk.pth", "dab_detr", OFFICIAL["dab_detr"])


@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_select_classes_keeps_the_chosen_outputs_in_order(arch):
    model, _ = _official_checkpoint(arch)
    images, mask = _batch()
    rows = [4, 0, 3]
    with torch.no_grad():
        want = model(images, mask)
        got = select_classes(model, rows)(images, mask)
    assert model.num_classes == 3 and got.logits.shape[-1] == 3
    assert_close(got.logits, want.logits[..., rows])
    assert_close(got.boxes, want.boxes)
    with pytest.raises(ValueError, match="rows must lie"):
        select_classes(model, [0, 3])  # now 3 classes wide
