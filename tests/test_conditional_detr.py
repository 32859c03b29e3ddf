"""Tests for kd.models.conditional_detr (and the shared kd.models.transformer_layers it is built from)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kd.models.backbone import Backbone
from kd.models.conditional_detr import ConditionalDETR
from kd.models.convert import HF_CONDITIONAL_DECODER, HF_CONDITIONAL_ENCODER, kd_to_hf_state
from kd.models.transformer_layers import encode_single_scale

HIDDEN, QUERIES, CLASSES, LAYERS = 32, 10, 5, 2


def tiny(stride: int = 32, backbone: nn.Module | None = None) -> ConditionalDETR:
    torch.manual_seed(0)
    backbone = backbone or Backbone("resnet18", (stride,))
    return ConditionalDETR(
        backbone, HIDDEN, nheads=2, enc_layers=1, dec_layers=LAYERS, ffn_dim=64, dropout=0.0,
        num_queries=QUERIES, num_classes=CLASSES,
    )  # fmt: skip


def batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images; the second is padded on the right half and the bottom quarter."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    mask[1, :, size // 2 :] = True
    mask[1, 3 * size // 4 :] = True
    return images, mask


class PoolBackbone(nn.Module):
    """A padding-invariant stand-in for the ResNet: average pooling by ``stride`` and a 1x1 convolution."""

    def __init__(self, stride: int = 16, channels: int = 8):
        super().__init__()
        self.stride, self.num_channels = stride, [channels]
        self.proj = nn.Conv2d(3, channels, 1)

    def forward(self, images, mask):
        feat = self.proj(F.avg_pool2d(images, self.stride))
        return [(feat, F.interpolate(mask[None].float(), size=feat.shape[-2:]).bool()[0])]


@pytest.mark.parametrize("stride", [32, 16])
def test_output_shapes(stride):
    model = tiny(stride).eval()
    images, mask = batch()
    s = (64 // stride) ** 2
    out = model(images, mask, extra_queries={"points": torch.randn(1, 7, HIDDEN)}, return_attention=True)
    det = out.detection
    assert det.logits.shape == (LAYERS, 2, QUERIES, CLASSES)
    assert det.boxes.shape == (LAYERS, 2, QUERIES, 4)
    assert det.hidden.shape == (LAYERS, 2, QUERIES, HIDDEN)
    assert det.references.shape == (LAYERS, 2, QUERIES, 2)
    assert det.cross_attn.shape == (LAYERS, 2, QUERIES, s)
    assert det.queries.shape == (2, QUERIES, HIDDEN)
    assert out.extra["points"].logits.shape == (LAYERS, 2, 7, CLASSES)
    assert out.extra["points"].queries.shape == (2, 7, HIDDEN)
    assert out.memory.shape == (2, s, HIDDEN) and out.memory_mask.shape == (2, s)
    assert out.spatial_shapes.tolist() == [[64 // stride, 64 // stride]]
    assert out.features[0].shape == (2, HIDDEN, 64 // stride, 64 // stride)
    assert out.feature_masks[0].shape == (2, 64 // stride, 64 // stride)
    assert out.logits.shape == (2, QUERIES, CLASSES) and out.denoising is None
    assert bool(((det.boxes >= 0) & (det.boxes <= 1)).all())
    assert model.native_queries().shape == (QUERIES, HIDDEN) and model.query_format == "embed"


def test_initial_state_follows_official_init():
    model = tiny()
    assert_close(model.class_embed.bias, torch.full((CLASSES,), -4.59511985013459))
    assert_close(model.bbox_embed.layers[-1].weight, torch.zeros(4, HIDDEN))
    layer1 = model.transformer["decoder"].layers[1]
    assert layer1.ca_qpos_proj is None and model.transformer["decoder"].layers[0].ca_qpos_proj is not None


def test_extra_groups_do_not_change_detection():
    model = tiny().eval()
    images, mask = batch()
    with torch.no_grad():
        alone = model(images, mask)
        with_extra = model(
            images, mask, extra_queries={"a": torch.randn(2, 5, HIDDEN), "b": torch.randn(1, 3, HIDDEN)}
        )
    assert_close(with_extra.detection.logits, alone.detection.logits)
    assert_close(with_extra.detection.boxes, alone.detection.boxes)
    assert set(with_extra.extra) == {"a", "b"}


def test_extra_group_is_decoded_like_a_separate_pass():
    """A group holding the model's own queries reproduces the detection output: it sees only itself."""
    model = tiny().eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask, extra_queries={"copy": model.native_queries()[None]}, return_attention=True)
    for field in ("logits", "boxes", "hidden", "references", "cross_attn"):
        assert_close(getattr(out.extra["copy"], field), getattr(out.detection, field))


def test_cross_attention_is_a_distribution_over_unpadded_tokens():
    model = tiny(16).eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask, return_attention=True)
    attn = out.detection.cross_attn
    assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    padded = out.memory_mask[None, :, None, :].expand_as(attn)
    assert int(padded.sum()) > 0
    assert_close(attn[padded], torch.zeros(int(padded.sum())))


def test_attention_maps_do_not_change_outputs():
    """The explicit-softmax path (return_attention) and the SDPA path agree."""
    model = tiny(16).eval()
    images, mask = batch()
    with torch.no_grad():
        fast, explicit = model(images, mask), model(images, mask, return_attention=True)
    assert_close(explicit.detection.logits, fast.detection.logits)
    assert_close(explicit.detection.boxes, fast.detection.boxes)


def test_padding_invariance_in_eval_mode():
    model = tiny(backbone=PoolBackbone(16)).eval()
    torch.manual_seed(2)
    image = torch.randn(1, 3, 64, 48)
    canvas = torch.randn(2, 3, 96, 80)  # image 0 padded with garbage, image 1 fills its canvas
    canvas[0, :, :64, :48] = image[0]
    mask = torch.zeros(2, 96, 80, dtype=torch.bool)
    mask[0, 64:] = True
    mask[0, :, 48:] = True
    with torch.no_grad():
        alone = model(image, torch.zeros(1, 64, 48, dtype=torch.bool), return_attention=True)
        padded = model(canvas, mask, return_attention=True)
    assert_close(padded.detection.logits[:, :1], alone.detection.logits)
    assert_close(padded.detection.boxes[:, :1], alone.detection.boxes)
    valid = ~padded.memory_mask[0]
    assert_close(padded.detection.cross_attn[:, 0][..., valid], alone.detection.cross_attn[:, 0])


def test_gradient_reaches_backbone_and_queries():
    model = tiny().train()
    images, mask = batch()
    out = model(images, mask)
    (out.detection.logits.sum() + out.detection.boxes.sum()).backward()
    for p in (model.backbone.body.conv1.weight, model.input_proj.weight, model.query_embed.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_bf16_autocast_forward():
    model = tiny(16).eval()
    images, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask, extra_queries={"g": torch.randn(1, 4, HIDDEN)}, return_attention=True)
    assert bool(torch.isfinite(out.detection.boxes.float()).all())
    assert_close(out.detection.cross_attn.float().sum(-1), torch.ones(LAYERS, 2, QUERIES), atol=2e-2, rtol=0)


@pytest.mark.parametrize(("strides", "expected"), [([8, 16, 32], 32), ([16], 16)])
def test_from_config_uses_the_last_stride(strides, expected):
    cfg = {
        "arch": "conditional_detr", "backbone": "resnet18", "backbone_weights": None, "backbone_norm": "auto",
        "strides": strides, "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2, "ffn_dim": 64,
        "dropout": 0.0, "num_queries": 7, "num_classes": 3, "enc_points": 4, "two_stage": True,
        "dn_groups": 5,
    }  # fmt: skip
    model = ConditionalDETR.from_config(cfg)
    assert model.backbone.strides == (expected,)
    assert model.native_queries().shape == (7, 32) and model.class_embed.out_features == 3
    with pytest.raises(ValueError, match="hidden_dim"):
        ConditionalDETR.from_config({k: v for k, v in cfg.items() if k != "hidden_dim"})


def test_bad_extra_queries_raise():
    model = tiny().eval()
    images, mask = batch()
    with pytest.raises(ValueError, match="extra_queries"):
        model(images, mask, extra_queries={"boxes": torch.randn(1, 3, 4)})
    with pytest.raises(ValueError, match="reserved"):
        model(images, mask, extra_queries={"detection": torch.randn(1, 3, HIDDEN)})


# --- port and prove: the HF transformers port of the official code, weights copied from ours -------------
# (the HF <-> kd key mapping lives in kd.models.convert)


@pytest.mark.slow
def test_matches_hf_transformers_port():
    transformers = pytest.importorskip("transformers")
    from transformers.models.conditional_detr import modeling_conditional_detr as hf

    model = ConditionalDETR(
        Backbone("resnet18", (16,)), 32, nheads=2, enc_layers=2, dec_layers=3, ffn_dim=64, dropout=0.0,
        num_queries=QUERIES, num_classes=CLASSES,
    ).eval()  # fmt: skip
    cfg = transformers.ConditionalDetrConfig(
        d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        auxiliary_loss=False, num_queries=QUERIES, use_timm_backbone=False, use_pretrained_backbone=False,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    encoder, decoder = hf.ConditionalDetrEncoder(cfg).eval(), hf.ConditionalDetrDecoder(cfg).eval()
    ours_enc, ours_dec = model.transformer["encoder"].state_dict(), model.transformer["decoder"].state_dict()
    encoder.load_state_dict(kd_to_hf_state(encoder.state_dict().keys(), ours_enc, HF_CONDITIONAL_ENCODER))
    decoder.load_state_dict(kd_to_hf_state(decoder.state_dict().keys(), ours_dec, HF_CONDITIONAL_DECODER))

    images, mask = batch(96)
    with torch.no_grad():
        out = model(images, mask)
        enc = encode_single_scale(
            model.backbone,
            model.input_proj,
            model.position_embedding,
            model.transformer["encoder"],
            images,
            mask,
        )
        src = enc.feature.flatten(2).transpose(1, 2)
        keep = (~enc.memory_mask).long()
        memory = encoder(inputs_embeds=src, attention_mask=keep, spatial_position_embeddings=enc.pos)
        query_pos = model.query_embed.weight[None].expand(2, -1, -1)
        dec = decoder(
            inputs_embeds=torch.zeros_like(query_pos), encoder_hidden_states=out.memory,
            encoder_attention_mask=keep, spatial_position_embeddings=enc.pos,
            object_queries_position_embeddings=query_pos,
        )  # fmt: skip
    valid = ~enc.memory_mask
    assert_close(memory.last_hidden_state[valid], out.memory[valid])
    assert_close(dec.last_hidden_state, out.detection.hidden[-1])
    assert_close(dec.reference_points.transpose(0, 1), out.detection.references[-1])  # HF returns [Q, B, 2]
