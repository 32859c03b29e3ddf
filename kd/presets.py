"""Presets: YAML overlays of ``params.yaml`` (``presets/*.yaml``), deep-merged and validated before use.

    python -m kd.presets apply presets/dab_detr.yaml [--params params.yaml]  # rewrite params.yaml
    python -m kd.presets show presets/dab_detr.yaml        # the -S options for `dvc exp run`
    eval dvc exp run $(python -m kd.presets show presets/dab_detr.yaml)  # = make repro PRESET=...

A preset holds only the keys it changes. Every key must exist in the params file or be a key the code
reads there (a model / train key of :mod:`kd.config`, a field of a distiller's config, a DETR transform
option, a data-generator or pre-training field); the merge (:func:`kd.config.deep_merge`) must then pass
:func:`kd.config.validate` and the distillers' own checks. Anything else is a one-line error naming the
preset file and the key, exit status 2, and the params file is left untouched.

``apply`` rewrites the params file atomically, keeping its comments and layout (ruamel round trip) and
adding a ``# preset applied: <file>`` line at the top. ``show`` prints the same overlay as DVC 3 ``-S``
options in Hydra's override grammar: ``key=value`` for a key the params file has, ``++key=value`` for one
it lacks (DVC refuses plain ``key=`` for a new key), lists as ``[a,b]``, strings quoted when needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import re
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kd.config import MODEL_KEYS, ROLES, TRAIN_KEYS, deep_merge, read_yaml, validate
from kd.io import atomic_write

NOTE = "# preset applied: "
_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_./\-]*$")  # a string Hydra and YAML both read back unquoted
_KEYWORDS = {"null", "true", "false", "inf", "nan"}  # bare words Hydra reads as other types


@dataclass(frozen=True)
class Preset:
    """One preset file: its path as given, its text, and its values as PyYAML reads them."""

    path: str
    text: str
    values: dict


def read_preset(path: str | Path) -> Preset:
    """Read a preset file (PyYAML, as :func:`kd.config.load_params` reads params files)."""
    text, values = read_yaml(path, "preset")
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{path}: expected a non-empty mapping of params.yaml keys")
    return Preset(str(path), text, values)


def leaves(preset: Mapping, base: Mapping | None) -> Iterator[tuple[list[str], Any, bool]]:
    """Every value the preset sets: (key path, value, whether ``base`` has that key).

    A mapping merged onto a mapping is walked into (as :func:`kd.config.deep_merge` merges it); any other
    value replaces the base value whole and is one leaf.
    """
    for key, value in preset.items():
        has = isinstance(base, Mapping) and key in base
        sub = base[key] if has else None
        if isinstance(value, Mapping) and value and (isinstance(sub, Mapping) or not has):
            for path, v, inner in leaves(value, sub):
                yield [str(key), *path], v, inner
        else:
            yield [str(key)], value, has


def _known_fields() -> dict[tuple[str, ...], set[str]]:
    """Keys the code reads in sections that params.yaml does not list in full."""
    from kd.data.synthetic import SyntheticConfig
    from kd.data.transforms import COCO_TRANSFORMS
    from kd.distill.build import METHODS, distiller_fields
    from kd.pretrain import PretrainConfig

    known: dict[tuple[str, ...], set[str]] = {("model",): set(MODEL_KEYS)}
    for role in ROLES:
        known[(role, "model")] = set(MODEL_KEYS)
        known[(role, "train")] = set(TRAIN_KEYS)
    for method in METHODS:
        known[("distill", method)] = set(distiller_fields(method))
    known[("data", "transforms")] = set(COCO_TRANSFORMS)
    known[("data", "synthetic")] = {f.name for f in dataclasses.fields(SyntheticConfig)}
    known[("pretrain",)] = {f.name for f in dataclasses.fields(PretrainConfig)}
    return known


def check_keys(preset: Mapping, params: Mapping, source: str | Path) -> None:
    """Raise ``ValueError("<source>: <key>: unknown key ...")`` for a key neither in ``params`` nor read by
    the code."""
    known = _known_fields()
    for path, _, has in leaves(preset, params):
        if not has and path[-1] not in known.get(tuple(path[:-1]), ()):
            raise ValueError(
                f"{source}: {'.'.join(path)}: unknown key (not in the params file nor read by kd)"
            )


def check_params(params: dict) -> None:
    """:func:`kd.config.validate` plus what it leaves to the stages: data preset, transforms, distillers."""
    from kd.data.coco import CHECK_IMAGES
    from kd.data.transforms import build_transforms
    from kd.distill.build import METHODS, distiller_config

    validate(params)
    data = params.get("data") or {}
    if data.get("name", "synthetic") not in CHECK_IMAGES:
        raise ValueError(f"data.name: expected one of {', '.join(CHECK_IMAGES)}; got {data.get('name')!r}")
    if "transforms" in data:
        for train in (True, False):
            build_transforms(data["transforms"], train)
    for method in METHODS:
        if method in (params.get("distill") or {}):
            distiller_config(params, method)


def merge_presets(params: dict, presets: Sequence[Preset]) -> dict:
    """``params`` with each preset deep-merged in order, validated; errors name the (last) preset file."""
    merged = params
    for preset in presets:
        check_keys(preset.values, merged, preset.path)
        merged = deep_merge(merged, preset.values)
    try:
        check_params(merged)
    except ValueError as e:
        raise ValueError(f"{presets[-1].path}: {e}") from None
    return merged


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, read back by DVC as the same YAML value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value) if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        if _BARE.match(value) and value.lower() not in _KEYWORDS:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot express {value!r} ({type(value).__name__}) as a dvc -S value")


def _float_text(value: float) -> str:
    """A float with a dot before any exponent (``2.0e-05``): YAML 1.1 (PyYAML) reads ``2e-05`` as a string."""
    if not math.isfinite(value):
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[repr(value)]
    text = repr(value)
    return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text


def set_params_args(params: dict, presets: Sequence[Preset]) -> list[str]:
    """The ``dvc exp run`` options (``["-S", "key=value", ...]``) that turn ``params`` into the merge of
    ``presets`` (validated first); values the params already hold are left out."""
    merge_presets(params, presets)
    args, current = [], params
    for preset in presets:
        for path, value, has in leaves(preset.values, current):
            if has and _get(current, path) == value:
                continue
            args += ["-S", f"{'' if has else '++'}{'.'.join(path)}={hydra_value(value)}"]
        current = deep_merge(current, preset.values)
    return args


def _get(params: Mapping, path: list[str]) -> Any:
    for key in path:
        params = params[key]
    return params


def render(params_text: str, presets: Sequence[Preset], merged: dict) -> str:
    """The params file text with ``presets`` merged in, comments and layout kept, a note line on top.

    Raises ValueError if the text would not read back (PyYAML) as exactly ``merged``.
    """
    from ruamel.yaml import YAMLError

    yml = _round_trip_yaml()
    doc = yml.load(params_text)
    for preset in presets:
        try:
            _merge_into(doc, yml.load(preset.text))
        except YAMLError as e:  # e.g. a duplicate key, which PyYAML lets pass
            raise ValueError(f"{preset.path}: {str(e).strip().splitlines()[0]}") from None
    out = io.StringIO()
    yml.dump(doc, out)
    notes = []
    for line in params_text.splitlines():  # the notes of earlier applications head the file
        if not line.startswith(NOTE):
            break
        notes.append(line)
    body = [line for line in out.getvalue().splitlines() if not line.startswith(NOTE)]
    for preset in presets:
        note = f"{NOTE}{preset.path} (python -m kd.presets apply)"
        if not notes or notes[-1] != note:
            notes.append(note)
    text = "\n".join([*notes, *body]) + "\n"
    if yaml.safe_load(text) != merged:
        raise ValueError(f"{presets[-1].path}: the rewritten params file would not read back as the merge")
    return text


def _round_trip_yaml():
    """A ruamel round-trip YAML (comments, key order and flow lists survive) writing ``2.0e-05`` and ``null``
    as PyYAML reads them; its own representer class, so ruamel's global one (used by DVC) is untouched."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        pass

    Representer.add_representer(
        float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", _float_text(float(v)))
    )
    Representer.add_representer(type(None), lambda r, v: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    yml = YAML()
    yml.Representer = Representer
    yml.width = 4096
    yml.preserve_quotes = True
    return yml


def _merge_into(doc: Any, overlay: Mapping) -> None:
    """ruamel twin of :func:`kd.config.deep_merge`, in place (keeps ``doc``'s comments)."""
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(doc.get(key), Mapping):
            _merge_into(doc[key], value)
        else:
            doc[key] = value


def apply_presets(paths: Sequence[str | Path], params_path: str | Path = "params.yaml") -> dict:
    """Merge the preset files into the params file, validate, and rewrite it atomically; returns the new
    params. On any error (unknown key, invalid value) a ValueError naming the preset and the key is raised
    and the file is not touched.
    """
    from kd.config import load_params

    params_path = Path(params_path)
    presets = [read_preset(p) for p in paths]
    merged = merge_presets(load_params(params_path), presets)
    text = render(params_path.read_text(), presets, merged)
    with atomic_write(params_path) as tmp:
        tmp.write_text(text)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a bad preset)."""
    p = argparse.ArgumentParser(prog="python -m kd.presets", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("apply", "merge the preset(s) into the params file (validated, atomic)"),
        ("show", "print the preset(s) as `dvc exp run -S key=value` options"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("presets", nargs="+", help="preset YAML files, merged in order")
        cmd.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = p.parse_args(argv)
    from kd.config import load_params

    try:
        if args.command == "apply":
            apply_presets(args.presets, args.params)
            print(f"{args.params}: applied {', '.join(args.presets)}", file=sys.stderr)
        else:
            presets = [read_preset(p) for p in args.presets]
            print(shlex.join(set_params_args(load_params(args.params), presets)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
