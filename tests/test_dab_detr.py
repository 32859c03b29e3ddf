"""Tests for kd.models.dab_detr: anchor queries, extra groups, DN-DETR denoising, parity with the HF port."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kd.models.backbone import Backbone
from kd.models.convert import HF_DAB_DECODER, HF_DAB_ENCODER, kd_to_hf_state
from kd.models.dab_detr import DABDETR
from kd.models.transformer_layers import encode_single_scale

HIDDEN, QUERIES, CLASSES, LAYERS = 32, 10, 5, 2


def tiny(stride: int = 32, backbone: nn.Module | None = None, **kwargs) -> DABDETR:
    torch.manual_seed(0)
    backbone = backbone or Backbone("resnet18", (stride,))
    return DABDETR(
        backbone, HIDDEN, nheads=2, enc_layers=1, dec_layers=LAYERS, ffn_dim=64, num_queries=QUERIES,
        num_classes=CLASSES, **kwargs,
    )  # fmt: skip


def batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images; the second is padded on the right half and the bottom quarter."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, size, size)
    mask = torch.zeros(2, size, size, dtype=torch.bool)
    mask[1, :, size // 2 :] = True
    mask[1, 3 * size // 4 :] = True
    return images, mask


def targets() -> list[dict]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]


class PoolBackbone(nn.Module):
    """A padding-invariant stand-in for the ResNet: average pooling by ``stride`` and a 1x1 convolution."""

    def __init__(self, stride: int = 16, channels: int = 8):
        super().__init__()
        self.stride, self.num_channels = stride, [channels]
        self.proj = nn.Conv2d(3, channels, 1)

    def forward(self, images, mask):
        feat = self.proj(F.avg_pool2d(images, self.stride))
        return [(feat, F.interpolate(mask[None].float(), size=feat.shape[-2:]).bool()[0])]


def _randomise_box_head(model: DABDETR) -> None:
    """The official zero init makes every layer keep its anchor; perturb it so refinement is exercised."""
    torch.manual_seed(3)
    for p in model.bbox_embed.parameters():
        nn.init.normal_(p, std=0.3)


@pytest.mark.parametrize("stride", [32, 16])
def test_output_shapes(stride):
    model = tiny(stride).eval()
    images, mask = batch()
    s = (64 // stride) ** 2
    out = model(images, mask, extra_queries={"points": torch.randn(1, 7, 4)}, return_attention=True)
    det = out.detection
    assert det.logits.shape == (LAYERS, 2, QUERIES, CLASSES)
    assert det.boxes.shape == (LAYERS, 2, QUERIES, 4)
    assert det.hidden.shape == (LAYERS, 2, QUERIES, HIDDEN)
    assert det.references.shape == (LAYERS, 2, QUERIES, 4)
    assert det.cross_attn.shape == (LAYERS, 2, QUERIES, s)
    assert det.queries.shape == (2, QUERIES, 4)
    assert out.extra["points"].boxes.shape == (LAYERS, 2, 7, 4)
    assert out.memory.shape == (2, s, HIDDEN) and out.spatial_shapes.tolist() == [[64 // stride] * 2]
    assert out.features[0].shape == (2, HIDDEN, 64 // stride, 64 // stride)
    assert out.denoising is None and out.dn_meta is None
    assert model.native_queries().shape == (QUERIES, 4) and model.query_format == "box"
    assert_close(det.references[0], model.native_queries().sigmoid()[None].expand(2, -1, -1))


def test_defaults_follow_official_dab_detr():
    model = tiny()
    layer = model.transformer["encoder"].layers[0]
    assert isinstance(layer.activation, nn.PReLU) and layer.dropout.p == 0.0
    assert model.position_embedding.temperature == 20
    assert model.transformer["decoder"].layers[1].ca_qpos_proj is None
    assert_close(model.class_embed.bias, torch.full((CLASSES,), -4.59511985013459))


def test_anchor_refinement_feeds_the_next_layer():
    model = tiny().eval()
    _randomise_box_head(model)
    images, mask = batch()
    with torch.no_grad():
        det = model(images, mask).detection
    # layer l+1 starts from layer l's refined anchor (computed from the un-normalised layer output)
    assert float((det.references[1] - det.references[0]).abs().max()) > 1e-3
    assert bool(((det.boxes > 0) & (det.boxes < 1)).all())


def test_extra_groups_do_not_change_detection():
    model = tiny().eval()
    _randomise_box_head(model)
    images, mask = batch()
    with torch.no_grad():
        alone = model(images, mask)
        with_extra = model(images, mask, extra_queries={"a": torch.randn(2, 5, 4), "b": torch.randn(1, 3, 4)})
    assert_close(with_extra.detection.logits, alone.detection.logits)
    assert_close(with_extra.detection.boxes, alone.detection.boxes)
    assert set(with_extra.extra) == {"a", "b"}


def test_extra_group_is_decoded_like_a_separate_pass():
    """A group holding the model's own anchors reproduces the detection output (KD-DETR's specific points)."""
    model = tiny().eval()
    _randomise_box_head(model)
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


def test_padding_invariance_in_eval_mode():
    model = tiny(backbone=PoolBackbone(16)).eval()
    _randomise_box_head(model)
    torch.manual_seed(2)
    image = torch.randn(1, 3, 64, 48)
    canvas = torch.randn(2, 3, 96, 80)
    canvas[0, :, :64, :48] = image[0]
    mask = torch.zeros(2, 96, 80, dtype=torch.bool)
    mask[0, 64:] = True
    mask[0, :, 48:] = True
    with torch.no_grad():
        alone = model(image, torch.zeros(1, 64, 48, dtype=torch.bool))
        padded = model(canvas, mask)
    assert_close(padded.detection.logits[:, :1], alone.detection.logits)
    assert_close(padded.detection.boxes[:, :1], alone.detection.boxes)


def test_gradient_reaches_backbone_and_anchors():
    model = tiny().train()
    images, mask = batch()
    out = model(images, mask)
    (out.detection.logits.sum() + out.detection.boxes.sum()).backward()
    for p in (model.backbone.body.conv1.weight, model.input_proj.weight, model.refpoint_embed.weight):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_denoising_groups_in_training():
    model = tiny(dn_groups=3, dn_label_noise=0.5, dn_box_noise=0.4).train()
    images, mask = batch()
    torch.manual_seed(5)
    out = model(images, mask, targets=targets(), return_attention=True)
    n_dn = 3 * 2  # groups x max ground truths per image
    assert out.denoising is not None and out.dn_meta["pad_size"] == n_dn
    assert out.denoising.logits.shape == (LAYERS, 2, n_dn, CLASSES)
    assert out.denoising.boxes.shape == (LAYERS, 2, n_dn, 4)
    assert out.denoising.cross_attn.shape == (LAYERS, 2, n_dn, 4)
    assert out.detection.logits.shape == (LAYERS, 2, QUERIES, CLASSES)
    (out.denoising.boxes.sum() + out.denoising.logits.sum()).backward()
    assert float(model.label_embed.weight.grad.abs().sum()) > 0


def test_denoising_does_not_change_detection():
    """Detection queries may not see the DN queries (DN-DETR mask), so their output is the same without DN."""
    model = tiny(dn_groups=2).train()
    images, mask = batch()
    with torch.no_grad():
        with_dn = model(images, mask, targets=targets(), extra_queries={"g": torch.randn(1, 4, 4)})
        without = model(images, mask, extra_queries={"g": torch.randn(1, 4, 4)})
    assert with_dn.denoising is not None and without.denoising is None
    assert_close(with_dn.detection.logits, without.detection.logits)
    assert_close(with_dn.detection.boxes, without.detection.boxes)


def test_no_denoising_in_eval_mode():
    model = tiny(dn_groups=2).eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask, targets=targets())
    assert out.denoising is None and out.dn_meta is None


def test_patterns_multiply_the_detection_queries():
    model = tiny(num_patterns=3).eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
    assert out.detection.logits.shape == (LAYERS, 2, 3 * QUERIES, CLASSES)
    assert_close(out.detection.queries[:, :QUERIES], out.detection.queries[:, QUERIES : 2 * QUERIES])


def test_random_refpoints_xy():
    model = tiny(random_refpoints_xy=True)
    xy = model.native_queries().detach()[:, :2].sigmoid()
    assert bool(((xy > 0) & (xy < 1)).all()) and float(xy.std()) > 0.1


@pytest.mark.parametrize(("strides", "expected"), [([8, 16, 32], 32), ([16], 16)])
def test_from_config(strides, expected):
    cfg = {
        "arch": "dab_detr", "backbone": "resnet18", "backbone_weights": None, "backbone_norm": "auto",
        "strides": strides, "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2, "ffn_dim": 64,
        "dropout": 0.0, "num_queries": 7, "num_classes": 3, "enc_points": 4, "two_stage": True,
        "dn_groups": 5, "dn_label_noise": 0.5, "dn_box_noise": 0.4,
    }  # fmt: skip
    model = DABDETR.from_config(cfg)
    assert model.backbone.strides == (expected,)
    assert (model.dn_groups, model.dn_label_noise, model.dn_box_noise) == (5, 0.5, 0.4)
    assert model.native_queries().shape == (7, 4) and model.label_embed.num_embeddings == 4


def test_bf16_autocast_forward_backward():
    model = tiny(16, dn_groups=2).train()
    images, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask, targets=targets())
        loss = out.detection.boxes.float().sum() + out.denoising.logits.float().sum()
    loss.backward()
    assert bool(torch.isfinite(model.refpoint_embed.weight.grad).all())


# --- port and prove: the HF transformers port of the official code, weights copied from ours -------------
# (the HF <-> kd key mapping lives in kd.models.convert)


@pytest.mark.slow
def test_matches_hf_transformers_port():
    """Encoder memory, every decoder layer's hidden state and the refined anchors equal HF's DabDetr."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.dab_detr import modeling_dab_detr as hf

    torch.manual_seed(0)
    model = DABDETR(
        Backbone("resnet18", (16,)), 32, nheads=2, enc_layers=2, dec_layers=3, ffn_dim=64,
        num_queries=QUERIES, num_classes=CLASSES,
    ).eval()  # fmt: skip
    _randomise_box_head(model)
    for module in model.modules():
        if isinstance(module, nn.PReLU):
            nn.init.uniform_(module.weight, 0.1, 0.5)
    cfg = transformers.DabDetrConfig(
        hidden_size=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0,
        num_queries=QUERIES, use_timm_backbone=False, use_pretrained_backbone=False,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    encoder, decoder = hf.DabDetrEncoder(cfg).eval(), hf.DabDetrDecoder(cfg).eval()
    ours_enc, ours_dec = model.transformer["encoder"].state_dict(), model.transformer["decoder"].state_dict()
    encoder.load_state_dict(kd_to_hf_state(encoder.state_dict().keys(), ours_enc, HF_DAB_ENCODER))
    decoder.load_state_dict(kd_to_hf_state(decoder.state_dict().keys(), ours_dec, HF_DAB_DECODER))
    decoder.bbox_embed = model.bbox_embed

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
        keep = (~enc.memory_mask).long()
        src = enc.feature.flatten(2).transpose(1, 2)
        memory = encoder(inputs_embeds=src, attention_mask=keep, object_queries=enc.pos)
        dec = decoder(
            inputs_embeds=torch.zeros(2, QUERIES, 32), encoder_hidden_states=out.memory,
            memory_key_padding_mask=keep, object_queries=enc.pos,
            query_position_embeddings=model.refpoint_embed.weight[None].expand(2, -1, -1),
        )  # fmt: skip
    valid = ~enc.memory_mask
    assert_close(memory.last_hidden_state[valid], out.memory[valid])
    assert_close(dec.intermediate_hidden_states, out.detection.hidden)
    assert_close(dec.reference_points, out.detection.references)
