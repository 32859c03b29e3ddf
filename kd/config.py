"""The one config loader: ``params.yaml`` plus ``--set a.b=value`` overrides, merged and validated.

Layout (see ``params.yaml``): a shared ``model`` section that ``teacher.model`` / ``student.model`` override,
a ``loss`` section, and ``teacher.train`` / ``student.train`` training settings. Every bad value is reported
as a one-line ``ValueError`` naming the key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROLES = ("teacher", "student")
ARCHS = ("conditional_detr", "dab_detr", "deformable_detr")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")  # kd.models.backbone
BACKBONE_NORMS = ("auto", "frozen_bn", "bn", "gn")
DISTILL_METHODS = ("none", "qskd", "kd_detr", "detrdistill")
AMP_MODES = ("none", "bf16", "fp16", "auto")
LR_SCHEDULES = ("step", "cosine")

LOSS_KEYS = (
    "cls",
    "l1",
    "giou",
    "match_cls",
    "match_l1",
    "match_giou",
    "focal_alpha",
    "focal_gamma",
    "cls_loss",
    "vfl_alpha",
    "one2many_k",  # hybrid matching: each ground truth repeated k times for the one-to-many group
    "one2many_weight",
)
CLS_LOSSES = ("focal", "varifocal")  # kd.models.criterion.CLS_LOSSES

# every key the detectors' ``from_config`` may read at the top level of a ``model`` section
MODEL_KEYS = (
    "arch",
    "backbone",
    "backbone_weights",
    "backbone_norm",
    "backbone_trainable_layers",
    "strides",
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "ffn_dim",
    "dropout",
    "num_queries",
    "num_classes",
    "enc_points",
    "dec_points",
    "two_stage",
    "box_refine",
    "dn_groups",
    "dn_label_noise",
    "dn_box_noise",
    "extra_levels",  # Deformable DETR: extra stride-2 levels on top of the backbone's last
    "one2many_queries",  # Deformable DETR, two-stage: H-DETR's one-to-many group in training
    "look_forward_twice",  # Deformable DETR, box refinement: DINO's look forward twice
    "mixed_query_selection",  # Deformable DETR, two-stage: DINO's mixed query selection (learned content)
    "activation",
    "num_patterns",  # DAB-DETR
    "random_refpoints_xy",
)

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings of one role (``teacher.train`` / ``student.train``), defaults filled in.

    ``batch_size`` is the global batch (split over the processes under torchrun). ``lr_drop`` is the epoch
    at which every learning rate is multiplied by ``lr_drop_gamma`` (``None``: never) under ``lr_schedule:
    step``; ``lr_schedule: cosine`` decays every learning rate along a half cosine to ``lr_min_ratio`` of it
    at the end of ``epochs`` instead (``lr_drop`` must then be null). ``clip_max_norm`` of 0 disables
    gradient clipping. ``amp``: none | bf16 | fp16 (fp16 uses a GradScaler) | auto (bf16 where the device
    runs it natively, else none: :func:`kd.engine.resolve_amp`).
    """

    epochs: int
    batch_size: int
    lr: float
    lr_backbone: float | None = None  # None: same as lr
    weight_decay: float = 1.0e-4
    lr_drop: int | None = None
    lr_drop_gamma: float = 0.1
    lr_schedule: str = "step"  # step (lr_drop) | cosine (to lr_min_ratio at the end of epochs)
    lr_min_ratio: float = 0.01
    warmup_iters: int = 0
    clip_max_norm: float = 0.0
    lr_linear_proj_mult: float = 0.1  # Deformable DETR sampling_offsets / reference_points
    num_workers: int = 0
    amp: str = "none"
    eval_every: int = 1
    log_every: int = 50
    seed: int = 0
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    ema_decay: float = 0.0  # > 0: evaluate and ship an EMA of the weights (kd.ema.ModelEMA); 0: off
    ema_tau: float = 0.0  # EMA decay ramp in steps: decay * (1 - exp(-t / tau)); 0: constant decay


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> dict:
    """Read a params file and apply ``key.path=value`` overrides (values parsed as YAML).

    An override may only set a key that exists in the file, or a known model / train key under
    ``model``, ``teacher.model``, ``student.model``, ``teacher.train`` or ``student.train``.
    """
    path = Path(path)
    _, params = read_yaml(path, "params file")
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(params).__name__}")
    params = _numbers(params)  # DVC writes ``2e-05``, which YAML 1.1 reads as a string
    for item in overrides:
        apply_override(params, item)
    return params


def read_yaml(path: str | Path, what: str) -> tuple[str, Any]:
    """(text, parsed value) of a YAML file; an unreadable file or invalid YAML is a one-line ValueError."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None


def _numbers(node: Any) -> Any:
    """Strings that spell a number (``1e-4``, ``2e-05``: strings to YAML 1.1) become floats, recursively."""
    if isinstance(node, dict):
        return {k: _numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v) for v in node]
    if isinstance(node, str) and _NUMBER.match(node):
        return float(node)
    return node


def apply_override(params: dict, item: str) -> None:
    """Set one ``a.b.c=value`` override in place; an unknown key is a ValueError naming it."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected key=value")
    parts = key.split(".")
    if not _settable(params, parts):
        raise ValueError(
            f"--set {key}: unknown key (not in the params file, nor a known model, train, loss or distiller"
            " key)"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"--set {key}: value {text!r} is not valid YAML") from None
    if isinstance(value, str) and _NUMBER.match(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    node = params
    for k in parts[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {k!r} is not a mapping")
    node[parts[-1]] = value


def _settable(params: dict, parts: list[str]) -> bool:
    """True if ``parts`` names an existing key, a known key of a model/loss section (top level or a role's),
    a known train key of a role, or a field of a distiller's config (``distill.<method>.<field>``; fields
    left out of params.yaml take defaults)."""
    node: Any = params
    for k in parts:
        if not isinstance(node, dict) or k not in node:
            break
        node = node[k]
    else:
        return True
    if len(parts) == 2 and parts[0] in ("model", "loss"):
        return parts[1] in (MODEL_KEYS if parts[0] == "model" else LOSS_KEYS)
    if len(parts) == 3 and parts[0] in ROLES and parts[0] in params:
        known = {"model": MODEL_KEYS, "train": TRAIN_KEYS, "loss": LOSS_KEYS}
        return parts[2] in known.get(parts[1], ())
    if len(parts) == 3 and parts[0] == "distill":
        from kd.distill.build import distiller_fields  # lazy: kd.distill imports this module

        return parts[2] in distiller_fields(parts[1])
    return False


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """A new dict: ``base`` with ``override`` merged in recursively (override wins)."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _role_section(params: dict, role: str, section: str) -> dict:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    value = (params.get(role) or {}).get(section) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{role}.{section} must be a mapping; got {type(value).__name__}")
    return value


def model_config(params: dict, role: str) -> dict:
    """The model config of ``role``: ``params["model"]`` deep-merged with ``params[role]["model"]``."""
    return deep_merge(params.get("model") or {}, _role_section(params, role, "model"))


def loss_config(params: dict, role: str) -> dict:
    """The loss settings of ``role``: ``params["loss"]`` updated with ``params[role]["loss"]``."""
    return {**(params.get("loss") or {}), **_role_section(params, role, "loss")}


def _check_loss(section: dict, where: str) -> None:
    for key, value in section.items():
        if key not in LOSS_KEYS:
            raise ValueError(f"{where}.{key}: unknown key (known: {', '.join(LOSS_KEYS)})")
        if key == "cls_loss":
            _check_choice(value, f"{where}.{key}", CLS_LOSSES)
        else:
            _check_number(value, f"{where}.{key}", minimum=0.0)


def train_config(params: dict, role: str) -> TrainConfig:
    """The training settings of ``role`` (``params[role]["train"]``, the top-level seed as default)."""
    d = dict(_role_section(params, role, "train"))
    d.setdefault("seed", params.get("seed", 0))
    unknown = sorted(set(d) - set(TRAIN_KEYS))
    if unknown:
        raise ValueError(f"{role}.train.{unknown[0]}: unknown key (known: {', '.join(TRAIN_KEYS)})")
    missing = [k for k in ("epochs", "batch_size", "lr") if k not in d]
    if missing:
        raise ValueError(f"{role}.train.{missing[0]}: required key is missing")
    return TrainConfig(**d)


def validate(params: dict) -> None:
    """Check every value the pipeline reads; raise a one-line ValueError naming the first bad key."""
    if not isinstance(params.get("model"), dict):
        raise ValueError("model: a mapping with the shared model settings is required")
    _check_keys(params["model"], "model")
    for role in ROLES:
        if role not in params:
            continue
        overrides = _role_section(params, role, "model")
        _check_keys(overrides, f"{role}.model")
        _check_model(
            model_config(params, role),
            lambda k, r=role, o=overrides: f"{r}.model.{k}" if k in o else f"model.{k}",
        )
        _check_train(train_config(params, role), f"{role}.train")
    if "teacher" not in params and "student" not in params:
        _check_model(params["model"], lambda k: f"model.{k}")
    _check_int(params, "seed", "seed", minimum=0, required=False)
    _check_loss(params.get("loss") or {}, "loss")
    for role in ROLES:
        if role in params:
            _check_loss(_role_section(params, role, "loss"), f"{role}.loss")
    distill = params.get("distill")
    if isinstance(distill, dict) and "method" in distill:
        _check_choice(distill["method"], "distill.method", DISTILL_METHODS)
    for where, value in _find_key(params, "tau"):
        for v in value if isinstance(value, list) else [value]:  # a list is an ablation grid
            _check_number(v, where, minimum=-1.0, maximum=1.0)


def _check_keys(section: dict, where: str) -> None:
    unknown = [k for k in section if k not in MODEL_KEYS]
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown model key (known: {', '.join(MODEL_KEYS)})")


def _check_model(cfg: dict, name) -> None:
    """``name(key)`` gives the dotted key to report (the role override or the shared default)."""
    _check_choice(cfg.get("arch"), name("arch"), ARCHS)
    _check_choice(cfg.get("backbone"), name("backbone"), BACKBONES)
    if "backbone_norm" in cfg:
        _check_choice(cfg["backbone_norm"], name("backbone_norm"), BACKBONE_NORMS)
    for key in ("hidden_dim", "nheads", "num_queries", "num_classes", "dec_layers", "ffn_dim"):
        _check_int(cfg, key, name(key), minimum=1, required=key in ("hidden_dim", "nheads", "num_queries"))
    for key in ("enc_layers", "dn_groups", "one2many_queries"):
        _check_int(cfg, key, name(key), minimum=0, required=False)
    for key in ("enc_points", "dec_points"):
        _check_int(cfg, key, name(key), minimum=1, required=False)
    if cfg["hidden_dim"] % cfg["nheads"]:
        h, n = cfg["hidden_dim"], cfg["nheads"]
        raise ValueError(f"{name('hidden_dim')}: must be divisible by {name('nheads')} ({h} % {n} != 0)")
    if "dropout" in cfg:
        _check_number(cfg["dropout"], name("dropout"), minimum=0.0, maximum=1.0)
    strides = cfg.get("strides", [32])
    if not isinstance(strides, list) or not strides or any(s not in (4, 8, 16, 32) for s in strides):
        raise ValueError(
            f"{name('strides')}: expected a non-empty list drawn from 4, 8, 16, 32; got {strides!r}"
        )
    if cfg.get("backbone_trainable_layers") is not None:
        _check_int(cfg, "backbone_trainable_layers", name("backbone_trainable_layers"), minimum=0)
        if cfg["backbone_trainable_layers"] > 5:
            raise ValueError(f"{name('backbone_trainable_layers')}: must be in 0..5 or null")
    weights = cfg.get("backbone_weights")
    if weights is not None and not isinstance(weights, str):
        raise ValueError(f"{name('backbone_weights')}: expected a file path or null; got {weights!r}")


def _check_train(cfg: TrainConfig, where: str) -> None:
    for key in ("epochs", "batch_size", "eval_every", "log_every"):
        _check_int(dataclasses.asdict(cfg), key, f"{where}.{key}", minimum=1)
    for key in ("warmup_iters", "num_workers", "seed"):
        _check_int(dataclasses.asdict(cfg), key, f"{where}.{key}", minimum=0)
    if cfg.lr_drop is not None:
        _check_int(dataclasses.asdict(cfg), "lr_drop", f"{where}.lr_drop", minimum=0)
    _check_number(cfg.lr, f"{where}.lr", minimum=0.0, strict=True)
    if cfg.lr_backbone is not None:
        _check_number(cfg.lr_backbone, f"{where}.lr_backbone", minimum=0.0)
    for key in ("weight_decay", "clip_max_norm", "lr_drop_gamma", "lr_linear_proj_mult"):
        _check_number(getattr(cfg, key), f"{where}.{key}", minimum=0.0)
    _check_choice(cfg.amp, f"{where}.amp", AMP_MODES)
    _check_choice(cfg.lr_schedule, f"{where}.lr_schedule", LR_SCHEDULES)
    _check_number(cfg.lr_min_ratio, f"{where}.lr_min_ratio", minimum=0.0, maximum=1.0)
    if cfg.lr_schedule == "cosine" and cfg.lr_drop is not None:
        raise ValueError(f"{where}.lr_drop: must be null with lr_schedule cosine; got {cfg.lr_drop!r}")
    _check_number(cfg.ema_decay, f"{where}.ema_decay", minimum=0.0, maximum=0.99999)  # 0: off
    _check_number(cfg.ema_tau, f"{where}.ema_tau", minimum=0.0)
    if not isinstance(cfg.find_unused_parameters, bool):
        raise ValueError(
            f"{where}.find_unused_parameters: expected true or false; got {cfg.find_unused_parameters!r}"
        )


def _check_choice(value: Any, where: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{where}: expected one of {', '.join(choices)}; got {value!r}")


def _check_int(d: Mapping, key: str, where: str, minimum: int, required: bool = True) -> None:
    if key not in d:
        if required:
            raise ValueError(f"{where}: required key is missing")
        return
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{where}: expected {kind}; got {value!r}")


def _check_number(
    value: Any, where: str, minimum: float, maximum: float | None = None, strict: bool = False
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        lo = f"> {minimum}" if strict else f">= {minimum}"
        rng = f"in [{minimum}, {maximum}]" if maximum is not None else lo
        raise ValueError(f"{where}: expected a number {rng}; got {value!r}")


def _find_key(node: Any, key: str, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (dotted path, value) of a key named ``key`` anywhere in a nested dict/list."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if k == key:
                found.append((path, v))
            found.extend(_find_key(v, key, path))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(_find_key(v, key, f"{prefix}[{i}]"))
    return found
