"""``python -m kd.report``: run a stage notebook with papermill and render it to HTML, both atomically.

    python -m kd.report notebooks/30_distill.ipynb 30_distill_qskd -p method qskd -p max_iters 0

writes ``reports/nb/<name>.ipynb`` (the executed notebook) and ``reports/<name>.html`` (inputs hidden, no
script loaded from the network: figures are embedded, so a report opens offline as it is). Each
is written to a temporary file and renamed, so a killed run leaves the previous versions intact; a failing
notebook is kept as ``reports/nb/<name>.failed.ipynb`` with its traceback and the command exits non-zero.
Parameter values are parsed as YAML (``true`` is a boolean, ``3`` an int), unlike papermill's ``-p``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from kd.io import atomic_write

# nbconvert's lab template loads require.js, MathJax and mermaid from a CDN; the reports use none of them
OFFLINE_TEMPLATE = """{%- extends "index.html.j2" -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def html_exporter() -> Any:
    """nbconvert's lab HTML exporter with inputs and prompts hidden and no script fetched from the network."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(
        extra_loaders=[DictLoader({"kd_offline.html.j2": OFFLINE_TEMPLATE})],
        template_file="kd_offline.html.j2",
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )


def run_notebook(
    source: str | Path,
    name: str,
    parameters: dict,
    kernel: str = "kd",
    nb_dir: str | Path = "reports/nb",
    html_dir: str | Path = "reports",
) -> tuple[Path, Path]:
    """Execute ``source`` with ``parameters`` and write the executed notebook and its HTML rendering.

    Returns (executed notebook path, HTML path). Raises papermill's ``PapermillExecutionError`` when a cell
    fails (the partial notebook is kept as ``<name>.failed.ipynb``).
    """
    import papermill

    nb_path, html_path = Path(nb_dir) / f"{name}.ipynb", Path(html_dir) / f"{name}.html"
    nb_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = nb_path.with_name(f".{name}.running.ipynb")
    try:
        papermill.execute_notebook(
            str(source), str(tmp), parameters=parameters, kernel_name=kernel, cwd=".", log_output=True,
            progress_bar=False, request_save_on_cell_execute=True,
        )  # fmt: skip
    except BaseException:
        if tmp.exists():
            os.replace(tmp, nb_path.with_name(f"{name}.failed.ipynb"))
        raise
    os.replace(tmp, nb_path)
    body, _ = html_exporter().from_filename(str(nb_path))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(html_path) as out:
        Path(out).write_text(body, encoding="utf-8")
    return nb_path, html_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd.report", description=__doc__.splitlines()[0])
    p.add_argument("source", help="the source notebook, e.g. notebooks/00_data.ipynb")
    p.add_argument("name", help="output name: reports/nb/<name>.ipynb and reports/<name>.html")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("-k", "--kernel", default="kd")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill streams cell output (progress)
    logging.getLogger("papermill").setLevel(logging.INFO)
    parameters = {key: yaml.safe_load(value) for key, value in args.parameter}
    try:
        run_notebook(args.source, args.name, parameters, kernel=args.kernel)
    except Exception as e:  # papermill prints the failing cell; our own message stays one line
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        print(f"error: {args.source}: {type(e).__name__}: {last}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
