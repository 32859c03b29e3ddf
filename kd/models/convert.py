"""Published checkpoints as kd detectors: HF transformers models and the official repositories' ``.pth``.

* :func:`from_hf` turns a HF ``ConditionalDetrForObjectDetection``, ``DabDetrForObjectDetection`` or
  ``DeformableDetrForObjectDetection`` (an object, or a ``save_pretrained`` directory read offline) into
  the matching kd detector, whose ``logits`` / ``boxes`` equal HF's ``logits`` / ``pred_boxes``.
* :func:`from_official` loads a checkpoint of Atten4Vis/ConditionalDETR, IDEA-Research/DAB-DETR or
  fundamentalvision/Deformable-DETR (``checkpoint["model"]``); kd keeps the official parameter names, so
  only the backbone prefix (``backbone.0.body`` -> ``backbone.body``) changes and the official duplicates
  of shared heads (``transformer.decoder.bbox_embed`` / ``class_embed``) are dropped.

Both build the backbone with frozen batch norm (as HF and the official code do) and load strictly
(:func:`kd.checkpoint.load_model_state`: a mismatch is a ValueError naming the keys).

HF renames are written against transformers 5.x module names; older (4.x / ``save_pretrained``) names are
first normalised with the same renames transformers uses on load. HF's ResNet backbone maps onto the
torchvision ResNet of the same depth; timm ResNets already use torchvision names. Known deviations: kd's
two-stage Deformable DETR never selects padded proposals (HF and official can), and kd's DAB-DETR clamps
``inverse_sigmoid`` at 1e-3 as the official code (HF: 1e-5) -- both only matter at degenerate inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from kd.checkpoint import load_model_state
from kd.models import build_model

Rules = list[tuple[str, str]]

# --- HF transformers 5.x names -> kd names, relative to the encoder / decoder module ---------------------

HF_CONDITIONAL_ENCODER: Rules = [
    (r"self_attn\.o_proj", "self_attn.out_proj"), (r"self_attn_layer_norm", "norm1"),
    (r"mlp\.fc1", "linear1"), (r"mlp\.fc2", "linear2"), (r"final_layer_norm", "norm2"),
]  # fmt: skip
HF_CONDITIONAL_DECODER: Rules = [
    (r"self_attn\.q_content_proj", "sa_qcontent_proj"), (r"self_attn\.q_pos_proj", "sa_qpos_proj"),
    (r"self_attn\.k_content_proj", "sa_kcontent_proj"), (r"self_attn\.k_pos_proj", "sa_kpos_proj"),
    (r"self_attn\.v_proj", "sa_v_proj"), (r"self_attn\.o_proj", "self_attn.out_proj"),
    (r"self_attn_layer_norm", "norm1"), (r"encoder_attn\.q_content_proj", "ca_qcontent_proj"),
    (r"encoder_attn\.q_pos_proj", "ca_qpos_proj"), (r"encoder_attn\.k_content_proj", "ca_kcontent_proj"),
    (r"encoder_attn\.k_pos_proj", "ca_kpos_proj"), (r"encoder_attn\.v_proj", "ca_v_proj"),
    (r"encoder_attn\.q_pos_sine_proj", "ca_qpos_sine_proj"), (r"encoder_attn\.o_proj", "cross_attn.out_proj"),
    (r"encoder_attn_layer_norm", "norm2"), (r"mlp\.fc1", "linear1"), (r"mlp\.fc2", "linear2"),
    (r"final_layer_norm", "norm3"), (r"^layernorm", "norm"),
]  # fmt: skip
HF_DAB_ENCODER: Rules = [
    (r"self_attn_layer_norm", "norm1"), (r"fc1", "linear1"), (r"fc2", "linear2"),
    (r"final_layer_norm", "norm2"), (r"activation_fn", "activation"),
]  # fmt: skip
HF_DAB_DECODER: Rules = [
    (r"self_attn\.self_attn_query_content_proj", "sa_qcontent_proj"),
    (r"self_attn\.self_attn_query_pos_proj", "sa_qpos_proj"),
    (r"self_attn\.self_attn_key_content_proj", "sa_kcontent_proj"),
    (r"self_attn\.self_attn_key_pos_proj", "sa_kpos_proj"),
    (r"self_attn\.self_attn_value_proj", "sa_v_proj"),
    (r"self_attn\.self_attn\.output_proj", "self_attn.out_proj"),
    (r"self_attn\.self_attn_layer_norm", "norm1"),
    (r"cross_attn\.cross_attn_query_content_proj", "ca_qcontent_proj"),
    (r"cross_attn\.cross_attn_query_pos_proj", "ca_qpos_proj"),
    (r"cross_attn\.cross_attn_key_content_proj", "ca_kcontent_proj"),
    (r"cross_attn\.cross_attn_key_pos_proj", "ca_kpos_proj"),
    (r"cross_attn\.cross_attn_value_proj", "ca_v_proj"),
    (r"cross_attn\.cross_attn_query_pos_sine_proj", "ca_qpos_sine_proj"),
    (r"cross_attn\.cross_attn\.output_proj", "cross_attn.out_proj"),
    (r"cross_attn\.cross_attn_layer_norm", "norm2"),
    (r"mlp\.fc1", "linear1"), (r"mlp\.fc2", "linear2"), (r"mlp\.final_layer_norm", "norm3"),
    (r"mlp\.activation_fn", "activation"), (r"^layernorm", "norm"),
]  # fmt: skip
HF_DEFORMABLE_ENCODER: Rules = [
    (r"self_attn_layer_norm", "norm1"), (r"mlp\.fc1", "linear1"), (r"mlp\.fc2", "linear2"),
    (r"final_layer_norm", "norm2"),
]  # fmt: skip
HF_DEFORMABLE_DECODER: Rules = [
    (r"self_attn\.o_proj", "self_attn.out_proj"), (r"self_attn_layer_norm", "norm2"),
    (r"encoder_attn_layer_norm", "norm1"), (r"encoder_attn\.", "cross_attn."),
    (r"mlp\.fc1", "linear1"), (r"mlp\.fc2", "linear2"), (r"final_layer_norm", "norm3"),
]  # fmt: skip

_BACKBONE = "<backbone>"
# (HF prefix, kd prefix, rules applied to the rest of the key), first match wins
_HF_SECTIONS: dict[str, list[tuple[str, str, Rules]]] = {
    "conditional_detr": [
        ("model.backbone.", _BACKBONE, []),
        ("model.encoder.", "transformer.encoder.", HF_CONDITIONAL_ENCODER),
        ("model.decoder.", "transformer.decoder.", HF_CONDITIONAL_DECODER),
        ("model.input_projection.", "input_proj.", []),
        ("model.query_position_embeddings.", "query_embed.", []),
        ("class_labels_classifier.", "class_embed.", []),
        ("bbox_predictor.", "bbox_embed.", []),
    ],
    "dab_detr": [
        ("model.backbone.", _BACKBONE, []),
        ("model.encoder.", "transformer.encoder.", HF_DAB_ENCODER),
        ("model.decoder.", "transformer.decoder.", HF_DAB_DECODER),
        ("model.input_projection.", "input_proj.", []),
        ("model.query_refpoint_embeddings.", "refpoint_embed.", []),
        ("model.patterns.", "transformer.patterns.", []),
        ("bbox_predictor.", "bbox_embed.", []),
    ],
    "deformable_detr": [
        ("model.backbone.", _BACKBONE, []),
        ("model.encoder.", "transformer.encoder.", HF_DEFORMABLE_ENCODER),
        ("model.decoder.", "transformer.decoder.", HF_DEFORMABLE_DECODER),
        ("model.query_position_embeddings.", "query_embed.", []),
        ("model.input_proj.", "input_proj.", []),
        ("model.", "transformer.", []),  # level_embed, reference_points, enc_output(_norm), pos_trans(_norm)
    ],
}
# transformers 4.x / save_pretrained names -> 5.x names (the renames transformers applies when loading)
_HF_LEGACY: dict[str, Rules] = {
    "conditional_detr": [
        (r"backbone\.conv_encoder\.", "backbone."),
        (r"(self_attn|encoder_attn)\.out_proj", r"\1.o_proj"),
        (r"layers\.(\d+)\.fc([12])", r"layers.\1.mlp.fc\2"),
        (r"(decoder\.layers\.\d+)\.sa_(q|k)(content|pos)_proj", r"\1.self_attn.\2_\3_proj"),
        (r"(decoder\.layers\.\d+)\.sa_v_proj", r"\1.self_attn.v_proj"),
        (r"(decoder\.layers\.\d+)\.ca_(q|k)(content|pos)_proj", r"\1.encoder_attn.\2_\3_proj"),
        (r"(decoder\.layers\.\d+)\.ca_v_proj", r"\1.encoder_attn.v_proj"),
        (r"(decoder\.layers\.\d+)\.ca_qpos_sine_proj", r"\1.encoder_attn.q_pos_sine_proj"),
    ],
    "dab_detr": [],
    "deformable_detr": [
        (r"backbone\.conv_encoder\.", "backbone."),
        (r"self_attn\.out_proj", "self_attn.o_proj"),
        (r"layers\.(\d+)\.fc([12])", r"layers.\1.mlp.fc\2"),
    ],
}
_STAGE_KEY = re.compile(
    r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))\.(convolution|normalization)\."
)
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)$")
_DUPLICATES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def rename_key(key: str, rules: Rules) -> tuple[str, int | None]:
    """Apply ``rules`` (regex, replacement) in order to one HF key.

    Returns the kd key and, for a q/k/v projection that kd packs into ``nn.MultiheadAttention``'s
    ``in_proj_weight`` / ``in_proj_bias``, the index (0, 1, 2) of its chunk in the packed tensor (else None).
    """
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    m = _QKV.search(key)
    if m is None:
        return key, None
    return f"{key[: m.start()]}self_attn.in_proj_{m[2]}", "qkv".index(m[1])


def kd_to_hf_state(hf_keys: Iterable[str], kd_state: dict[str, Tensor], rules: Rules) -> dict[str, Tensor]:
    """The inverse lookup: for each HF key, the kd tensor it corresponds to (its q/k/v chunk when kd packs
    it). Used to copy kd weights into a HF module, e.g. to check a kd encoder/decoder against HF's."""
    out = {}
    for key in hf_keys:
        name, chunk = rename_key(key, rules)
        out[key] = kd_state[name] if chunk is None else kd_state[name].chunk(3)[chunk]
    return out


def _resnet_key(key: str) -> str:
    """HF ``ResNetBackbone`` key -> torchvision ResNet key (timm ResNet keys already are torchvision's)."""
    key = re.sub(r"^(conv_encoder\.)?model\.(_backbone\.)?", "", key)
    key = re.sub(r"^embedder\.embedder\.convolution\.", "conv1.", key)
    key = re.sub(r"^embedder\.embedder\.normalization\.", "bn1.", key)

    def stage(m: re.Match) -> str:
        block = f"layer{int(m[1]) + 1}.{m[2]}."
        if m[3] == "shortcut":
            return block + ("downsample.0." if m[5] == "convolution" else "downsample.1.")
        return block + ("conv" if m[5] == "convolution" else "bn") + str(int(m[4]) + 1) + "."

    return _STAGE_KEY.sub(stage, key)


def _hf_key(key: str, arch: str) -> tuple[str, int | None]:
    for hf_prefix, kd_prefix, rules in _HF_SECTIONS[arch]:
        if key.startswith(hf_prefix):
            rest = key[len(hf_prefix) :]
            if kd_prefix == _BACKBONE:
                return "backbone.body." + _resnet_key(rest), None
            name, chunk = rename_key(rest, rules)
            return kd_prefix + name, chunk
    return key, None  # unknown: left for the strict load to report


def hf_state_to_kd(state: dict[str, Tensor], arch: str, own_keys: Iterable[str]) -> dict[str, Tensor]:
    """Rename a HF ``...ForObjectDetection`` state dict (5.x or legacy names) to kd's ``arch`` layout.

    q/k/v projections are packed, weights HF ties (and omits when saving) are filled from their source,
    and HF's copies of kd's shared heads are dropped. ``own_keys``: the kd model's state-dict keys.
    """
    out: dict[str, Tensor] = {}
    packs: dict[str, list[Tensor | None]] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _HF_LEGACY[arch]:
            key = re.sub(pattern, repl, key)
        name, chunk = _hf_key(key, arch)
        if chunk is None:
            out[name] = value
        else:
            packs.setdefault(name, [None, None, None])[chunk] = value
    for name, parts in packs.items():
        if any(p is None for p in parts):
            raise ValueError(f"{arch}: HF state dict lacks some of the q/k/v projections of {name}")
        out[name] = torch.cat(parts)
    own_keys = list(own_keys)
    return _drop_duplicates(_fill_tied(out, own_keys), own_keys)


def _fill_tied(state: dict[str, Tensor], own_keys: list[str]) -> dict[str, Tensor]:
    """Fill kd keys whose HF weight is tied to another one (and so missing from a saved checkpoint)."""
    for key in own_keys:
        if key in state:
            continue
        sources = []
        if m := re.match(r"(class_embed|bbox_embed)\.(\d+)\.(.+)", key):
            sources = [f"transformer.decoder.{m[1]}.{m[2]}.{m[3]}", f"{m[1]}.0.{m[3]}"]
        elif m := re.match(r"transformer\.decoder\.(bbox_embed\..+)", key):
            sources = [m[1]]
        elif m := re.match(r"bbox_embed\.(layers\..+)", key):  # DAB-DETR: the decoder holds a tied copy
            sources = [f"transformer.decoder.bbox_embed.{m[1]}"]
        for src in sources:
            if src in state:
                state[key] = state[src]
                break
    return state


def _drop_duplicates(state: dict[str, Tensor], own_keys: list[str]) -> dict[str, Tensor]:
    """Drop the second registrations of shared heads that the kd model does not have."""
    own = set(own_keys)
    return {k: v for k, v in state.items() if k in own or not k.startswith(_DUPLICATES)}


# --- HF config -> kd model config ----------------------------------------------------------------------

# (layer_type, depths, hidden_sizes) of the HF ResNetConfig equal to each torchvision ResNet
_TORCHVISION_RESNETS = {
    ("basic", (2, 2, 2, 2), (64, 128, 256, 512)): "resnet18",
    ("basic", (3, 4, 6, 3), (64, 128, 256, 512)): "resnet34",
    ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)): "resnet50",
    ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)): "resnet101",
}


def _resnet_name(bc: dict) -> str:
    """The torchvision ResNet whose layout equals a HF ``ResNetConfig`` (dict)."""
    layout = (bc.get("layer_type"), tuple(bc.get("depths", ())), tuple(bc.get("hidden_sizes", ())))
    standard = (
        bc.get("embedding_size", 64) == 64
        and bc.get("hidden_act", "relu") == "relu"
        and not bc.get("downsample_in_first_stage", False)
        and not bc.get("downsample_in_bottleneck", False)
    )
    if layout not in _TORCHVISION_RESNETS or not standard:
        raise ValueError(f"backbone_config: HF ResNet {layout} has no torchvision ResNet equivalent")
    return _TORCHVISION_RESNETS[layout]


def _hf_backbone(config: dict, arch: str) -> tuple[str, list[int]]:
    """(torchvision ResNet name, output strides) of a HF detector config's backbone."""
    levels = config.get("num_feature_levels", 1)
    default_indices = [2, 3, 4] if arch == "deformable_detr" and levels > 1 else [4]
    bc = config.get("backbone_config")
    if config.get("dilation"):
        raise ValueError(f"{arch}: dilation (DC5 backbone) is not supported")
    if bc is None:  # legacy config: a timm backbone named by "backbone"
        if not config.get("use_timm_backbone", True):
            raise ValueError(f"{arch}: config has neither backbone_config nor a timm backbone name")
        name, indices = config.get("backbone") or "resnet50", default_indices
    elif bc.get("model_type") == "timm_backbone":
        name, indices = bc.get("backbone") or "resnet50", bc.get("out_indices") or default_indices
    elif bc.get("model_type") == "resnet":
        name = _resnet_name(bc)
        indices = bc.get("out_indices") or [int(s.removeprefix("stage")) for s in bc.get("out_features", [])]
        indices = indices or default_indices
    else:
        raise ValueError(f"{arch}: backbone {bc.get('model_type')!r} is not supported (ResNet only)")
    if name not in _TORCHVISION_RESNETS.values():
        raise ValueError(f"{arch}: backbone {name!r} is not supported (resnet18/34/50/101)")
    return name, [2 ** (i + 1) for i in indices]


def _same(config: dict, a: str, b: str, arch: str):
    if config.get(a) != config.get(b):
        raise ValueError(f"{arch}: {a}={config.get(a)} != {b}={config.get(b)}; kd uses one value for both")
    return config[a]


def config_from_hf(config: dict) -> dict:
    """The kd model config (params.yaml ``model`` layout) of a HF detector config (``config.to_dict()`` or
    config.json). Raises ValueError for options kd does not implement."""
    arch = str(config.get("model_type")).replace("-", "_")  # DAB-DETR's model_type is "dab-detr"
    if arch not in _HF_SECTIONS:
        raise ValueError(f"config.json: model_type {arch!r} is not one of {', '.join(_HF_SECTIONS)}")
    if config.get("position_embedding_type", "sine") != "sine":
        raise ValueError(f"{arch}: only sine position embeddings are supported")
    name, strides = _hf_backbone(config, arch)
    labels = config.get("id2label")
    cfg = {
        "arch": arch,
        "backbone": name,
        "backbone_weights": None,
        "backbone_norm": "frozen_bn",
        "strides": strides[-1:],
        "hidden_dim": config.get("d_model", config.get("hidden_size")),
        "nheads": _same(config, "encoder_attention_heads", "decoder_attention_heads", arch),
        "enc_layers": config["encoder_layers"],
        "dec_layers": config["decoder_layers"],
        "ffn_dim": _same(config, "encoder_ffn_dim", "decoder_ffn_dim", arch),
        "dropout": config.get("dropout", 0.0),
        "num_queries": config["num_queries"],
        "num_classes": len(labels) if labels else config["num_labels"],
        "activation": config.get("activation_function", "relu"),
    }
    if arch == "dab_detr":
        scale = config.get("sine_position_embedding_scale")
        if (
            config.get("keep_query_pos") or config.get("normalize_before") or config.get("query_dim", 4) != 4
            or config.get("temperature_height", 20) != 20 or config.get("temperature_width", 20) != 20
            or (scale is not None and not math.isclose(scale, 2 * math.pi))
        ):  # fmt: skip
            raise ValueError("dab_detr: keep_query_pos, normalize_before, query_dim != 4 and non-default "
                             "position-embedding temperature/scale are not supported")  # fmt: skip
        cfg["num_patterns"] = config.get("num_patterns", 0)
    if arch == "deformable_detr":
        levels = config.get("num_feature_levels", 4)
        if levels < len(strides):
            raise ValueError(f"deformable_detr: num_feature_levels {levels} < {len(strides)} backbone levels")
        two_stage = bool(config.get("two_stage", False))
        cfg.update(
            strides=strides,
            extra_levels=levels - len(strides),
            enc_points=config.get("encoder_n_points", 4),
            dec_points=config.get("decoder_n_points", 4),
            two_stage=two_stage,
            box_refine=bool(config.get("with_box_refine", False)),
            dn_groups=0,
            num_queries=config.get("two_stage_num_proposals", 300) if two_stage else config["num_queries"],
        )
    return cfg


# --- public entry points -------------------------------------------------------------------------------


def _read_hf_dir(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """config.json and the weights (safetensors, sharded safetensors or pytorch_model.bin) of a
    ``save_pretrained`` directory; nothing is downloaded."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json (expected a HF save_pretrained directory)")
    config = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file() or index.is_file():
        from safetensors.torch import load_file

        files = ["model.safetensors"]
        if not (path / "model.safetensors").is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(path / name))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")
    return config, state


def from_hf(model_or_dir: nn.Module | str | Path) -> nn.Module:
    """The kd detector equal to a HF transformers ``...ForObjectDetection`` model, in eval mode.

    Args:
        model_or_dir: a ``ConditionalDetrForObjectDetection``, ``DabDetrForObjectDetection`` or
            ``DeformableDetrForObjectDetection``, or the directory it was ``save_pretrained`` to.

    Returns:
        The kd detector (built with :func:`config_from_hf`); on the same images (``mask = ~pixel_mask``) its
        ``out.logits`` [B, Q, C] and ``out.boxes`` [B, Q, 4] equal HF's ``logits`` and ``pred_boxes``.
    """
    if isinstance(model_or_dir, (str, Path)):
        source = Path(model_or_dir)
        config, state = _read_hf_dir(source)
        kind = (config.get("architectures") or ["ForObjectDetection"])[0]
    else:
        source = kind = type(model_or_dir).__name__
        if not hasattr(model_or_dir, "config"):
            raise ValueError(f"{source}: not a HF transformers model")
        config, state = model_or_dir.config.to_dict(), model_or_dir.state_dict()
    if not kind.endswith("ForObjectDetection"):
        raise ValueError(f"{source}: {kind} has no detection heads (expected ...ForObjectDetection)")
    cfg = config_from_hf(config)
    model = build_model(cfg)
    own = model.state_dict().keys()
    load_model_state(model, hf_state_to_kd(state, cfg["arch"], own), source)
    return model.eval()


def official_state_to_kd(state: dict[str, Tensor], own_keys: Iterable[str]) -> dict[str, Tensor]:
    """Official repository state dict -> kd names (backbone prefix; duplicates of shared heads dropped)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        out[re.sub(r"^backbone\.0\.body\.", "backbone.body.", key)] = value
    return _drop_duplicates(out, list(own_keys))


def official_state_dict(model: nn.Module, arch: str) -> dict[str, Tensor]:
    """The inverse of :func:`official_state_to_kd`: ``model``'s weights in the official repository's layout
    (with the duplicate registrations of shared heads the official models have)."""
    state = {re.sub(r"^backbone\.body\.", "backbone.0.body.", k): v for k, v in model.state_dict().items()}
    shared = []
    if arch == "dab_detr":  # DAB-DETR: transformer.decoder.bbox_embed = bbox_embed (iter_update)
        shared.append("bbox_embed.")
    if arch == "deformable_detr" and getattr(model, "two_stage", False):
        shared.append("class_embed.")  # two-stage: transformer.decoder.class_embed = class_embed
    state.update({f"transformer.decoder.{k}": v for k, v in state.items() if k.startswith(tuple(shared))})
    return state


def _official_arch(keys: Iterable[str]) -> str | None:
    """The architecture an official state dict belongs to, from its distinctive keys (None if unclear)."""
    keys = set(keys)
    if "transformer.level_embed" in keys:
        return "deformable_detr"
    if "refpoint_embed.weight" in keys:
        return "dab_detr"
    if "query_embed.weight" in keys and "transformer.decoder.ref_point_head.layers.0.weight" in keys:
        return "conditional_detr"
    return None


def _load_official(state_dict_or_path: dict | str | Path) -> tuple[dict[str, Tensor], str]:
    if isinstance(state_dict_or_path, dict):
        ckpt, source = state_dict_or_path, "<state dict>"
    else:
        source = str(state_dict_or_path)
        if not Path(source).is_file():
            raise ValueError(f"{source}: no such checkpoint file")
        # official checkpoints store their argparse arguments next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(source, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
                raise ValueError(f"{source}: cannot be loaded with weights_only=True ({e!s:.160})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict or a checkpoint with a 'model' state dict")
    return state, source


def from_official(state_dict_or_path: dict | str | Path, arch: str, cfg: dict) -> nn.Module:
    """The kd detector holding an official repository's checkpoint, in eval mode.

    Args:
        state_dict_or_path: ``checkpoint.pth`` of Atten4Vis/ConditionalDETR, IDEA-Research/DAB-DETR or
            fundamentalvision/Deformable-DETR (loaded with ``weights_only=True``), the checkpoint dict, or
            its ``checkpoint["model"]`` state dict.
        arch: conditional_detr | dab_detr | deformable_detr.
        cfg: the kd model config matching the checkpoint (params.yaml ``model`` layout: backbone, sizes,
            num_queries, num_classes, strides / extra_levels, two_stage, box_refine; ``dn_groups: 0``, the
            official models have no denoising embedding). The backbone norm is forced to frozen_bn.

    Raises:
        ValueError naming the architecture the checkpoint looks like, or the mismatched keys.
    """
    state, source = _load_official(state_dict_or_path)
    found = _official_arch(state)
    if found is not None and found != arch:
        raise ValueError(f"{source}: this is a {found} checkpoint, not {arch}")
    model = build_model({**cfg, "arch": arch, "backbone_weights": None, "backbone_norm": "frozen_bn"})
    own = model.state_dict().keys()
    load_model_state(model, official_state_to_kd(state, own), source)
    return model.eval()


def select_classes(model: nn.Module, rows: list[int]) -> nn.Module:
    """Keep only the classification outputs ``rows`` of every class head (and DN label embedding), in order.

    Published COCO checkpoints have 91 outputs indexed by COCO category id (with unused ids); the data
    pipeline uses contiguous labels ``0..79``. ``rows[label]`` is the output that becomes ``label``, i.e. the
    category id of each label (``CocoDetection.label_to_cat_id``). Shared heads stay shared. A two-stage
    Deformable DETR ranks its proposals by column 0 of its encoder head, which is kept first when that head
    is its own module (box refinement); with one head shared by all layers the proposals may change.

    Raises:
        ValueError: a row outside the model's classes.
    """
    old = int(model.num_classes)
    if not rows or min(rows) < 0 or max(rows) >= old:
        raise ValueError(f"select_classes: rows must lie in [0, {old}), got {min(rows)}..{max(rows)}")
    index = torch.as_tensor(rows)
    proposal_head = _proposal_head(model)
    done: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in done:
            continue
        if "class_embed" in name and isinstance(module, nn.Linear) and module.out_features == old:
            # two-stage proposals rank by column 0 (class-agnostic objectness): keep it first there
            keep = torch.as_tensor([0, *rows[1:]]) if module is proposal_head else index
            module.weight = nn.Parameter(module.weight.data[keep].clone())
            module.bias = nn.Parameter(module.bias.data[keep].clone())
            module.out_features = len(rows)
        elif "label" in name and isinstance(module, nn.Embedding) and module.num_embeddings in (old, old + 1):
            keep = torch.cat([index, torch.arange(old, module.num_embeddings)])  # DAB keeps "unknown" last
            module.weight = nn.Parameter(module.weight.data[keep].clone())
            module.num_embeddings = len(keep)
        done.add(id(module))
    model.num_classes = len(rows)
    return model


def _proposal_head(model: nn.Module) -> nn.Module | None:
    """The two-stage encoder class head when it is a module of its own (not shared with the decoder)."""
    heads = getattr(model, "class_embed", None)
    if not getattr(model, "two_stage", False) or not isinstance(heads, nn.ModuleList):
        return None
    head = heads[-1]
    return None if any(h is head for h in heads[:-1]) else head
