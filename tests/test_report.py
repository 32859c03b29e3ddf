"""Tests for kd/report.py: papermill run + HTML rendering, atomic outputs, failing notebooks."""

from __future__ import annotations

import re

import nbformat
import pytest

from kd.report import main, run_notebook


def _notebook(path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("flag = False\nn = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.slow
def test_parameters_are_yaml_typed_and_outputs_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _notebook(tmp_path / "nb.ipynb", "assert flag is True and n == 3\nprint('flag-ok', n * 2)")
    assert main(["nb.ipynb", "stage", "-k", "python3", "-p", "flag", "true", "-p", "n", "3"]) == 0
    assert "flag-ok 6" in (tmp_path / "reports" / "nb" / "stage.ipynb").read_text()
    html = (tmp_path / "reports" / "stage.html").read_text()
    assert "flag-ok 6" in html and "assert flag is True" not in html  # inputs hidden
    assert not re.search(r"<script[^>]*\bsrc=", html)  # nothing fetched from a CDN: opens offline
    assert not list((tmp_path / "reports" / "nb").glob(".*"))  # no temporary file left


@pytest.mark.slow
def test_failing_notebook_keeps_previous_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _notebook(tmp_path / "nb.ipynb", "print('version', n)\nassert n < 2, 'n too large'")
    nb_path, html_path = run_notebook("nb.ipynb", "stage", {"n": 1}, kernel="python3")
    before = (nb_path.read_text(), html_path.read_text())
    assert main(["nb.ipynb", "stage", "-k", "python3", "-p", "n", "5"]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0  # one-line error
    assert (nb_path.read_text(), html_path.read_text()) == before
    assert "n too large" in (tmp_path / "reports" / "nb" / "stage.failed.ipynb").read_text()
