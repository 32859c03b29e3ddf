"""Tests for kd/tables.py: tables from hand-written metrics files (values, mean ± std, missing runs)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kd import tables
from kd.tables import Experiments

ABLATIONS = {
    "qskd_no_gqs": ("qskd", "distill.qskd.gqs=false"),
    "kd_detr_no_general": ("kd_detr", "distill.kd_detr.general=false"),
    "kd_detr_no_fg": ("kd_detr", "distill.kd_detr.fg_rebalance=false"),
    "kd_detr_t5": ("kd_detr", "distill.kd_detr.temperature=5"),
    "detrdistill_no_qpad": ("detrdistill", "distill.detrdistill.qpad=false"),
}


def _write(metrics_dir, run: str, ap: float, **extra) -> None:
    metrics_dir.mkdir(parents=True, exist_ok=True)
    record = {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 10, "APm": ap, "APl": ap + 10, **extra}
    (metrics_dir / f"{run}.json").write_text(json.dumps(record))


@pytest.fixture
def metrics(tmp_path):
    d = tmp_path / "metrics"
    _write(d, "teacher", 40.0)
    _write(d, "student_none", 20.0)
    _write(d, "seed1_none", 22.0)  # seed 2 of the baseline is missing
    for run, ap in (("student_qskd", 25.0), ("seed1_qskd", 27.0), ("seed2_qskd", 29.0)):
        _write(d, run, ap)
    _write(d, "student_kd_detr", 24.0)
    _write(d, "ablation_kd_detr_no_general", 23.5)
    _write(d, "ablation_kd_detr_t5", 24.25)
    _write(d, "tau_0.5", 26.0)
    _write(d, "tau_-0.5", 21.0)
    (d / "points_10.json").write_text(json.dumps({"epoch": 0, "AP": 22.0}))  # AP only
    return d


class TestExperiments:
    def test_reads_the_section(self):
        params = {
            "experiments": {
                "seeds": [1, 2],
                "ablations": {"a": {"method": "qskd", "overrides": "distill.qskd.gqs=false"}},
                "tau_sweep": [-0.5, 0.25],
                "points_sweep": [10],
            }
        }
        exp = Experiments.from_params(params)
        assert exp == Experiments((1, 2), {"a": ("qskd", "distill.qskd.gqs=false")}, (-0.5, 0.25), (10,))

    def test_missing_section_means_no_extra_runs(self):
        assert Experiments.from_params({}) == Experiments()

    @pytest.mark.parametrize(
        ("section", "match"),
        [
            ({"seeds": [0]}, "experiments.seeds"),  # seed 0 is the main run
            ({"seeds": [1.5]}, "experiments.seeds"),
            ({"tau_sweep": [2.0]}, "experiments.tau_sweep"),
            ({"points_sweep": [0]}, "experiments.points_sweep"),
            ({"ablations": {"x": {"method": "none", "overrides": ""}}}, "experiments.ablations.x.method"),
            ({"ablations": {"x": {"method": "qskd"}}}, "experiments.ablations.x: expected a mapping"),
            ({"ablations": {"x": {"method": "qskd", "overrides": 3}}}, "experiments.ablations.x.overrides"),
            ({"sweeps": []}, "experiments.sweeps: unknown key"),
        ],
    )
    def test_bad_values_name_the_key(self, section, match):
        with pytest.raises(ValueError, match=match):
            Experiments.from_params({"experiments": section})


def test_main_points_and_tau_defaults():
    params = {"model": {"num_queries": 50}, "student": {"model": {"num_queries": 30}}, "distill": {}}
    assert tables.main_points(params) == 30  # num_general null: the student's num_queries
    params["distill"] = {"kd_detr": {"num_general": 7}, "qskd": {"tau": 0.25}}
    assert tables.main_points(params) == 7
    assert tables.main_tau(params) == 0.25
    assert tables.main_tau({}) == 0.0


class TestMainTable:
    def test_mean_and_std_over_seeds(self, metrics):
        stats = tables.main_stats(metrics, seeds=[1, 2])
        assert stats.loc["+ QSKD", "AP"] == pytest.approx(27.0)
        assert stats.loc["+ QSKD", "AP_std"] == pytest.approx(2.0)  # sample std of 25, 27, 29
        assert stats.loc["student", "AP"] == pytest.approx(21.0)
        assert stats.loc["student", "AP_std"] == pytest.approx(math.sqrt(2))
        assert stats.loc["+ KD-DETR", "runs"] == 1
        assert math.isnan(stats.loc["+ KD-DETR", "AP_std"])  # one run: no std
        assert stats.loc["+ DETRDistill", "runs"] == 0

    def test_formatting_gain_and_missing(self, metrics):
        table = tables.main_table(metrics, seeds=[1, 2])
        assert list(table.index) == ["teacher", "student", "+ QSKD", "+ KD-DETR", "+ DETRDistill"]
        assert table.loc["+ QSKD", "AP"] == "27.0 ± 2.0"
        assert table.loc["+ QSKD", "AP50"] == "47.0 ± 2.0"
        assert table.loc["student", "AP"] == "21.0 ± 1.4"
        assert table.loc["+ KD-DETR", "AP"] == "24.0"
        assert table.loc["teacher", "AP"] == "40.0"
        assert table.loc["+ DETRDistill", "AP"] == tables.NOT_RUN
        assert table.loc["+ QSKD", "seeds"] == "3/3"
        assert table.loc["student", "seeds"] == "2/3"
        assert table.loc["+ QSKD", "gain"] == "+6.0"  # difference of the means 27 - 21
        assert table.loc["+ KD-DETR", "gain"] == "+3.0"
        assert table.loc["+ DETRDistill", "gain"] == ""
        assert table.loc["student", "gain"] == ""
        assert table.loc["+ QSKD", "paper gain"].startswith("+4.1")
        assert table.loc["teacher", "paper gain"] == ""

    def test_seed_zero_only(self, metrics):
        table = tables.main_table(metrics)
        assert table.loc["+ QSKD", "AP"] == "25.0"
        assert table.loc["+ QSKD", "gain"] == "+5.0"

    def test_metric_missing_from_a_record(self, tmp_path):
        (tmp_path / "student_none.json").write_text(json.dumps({"epoch": 0, "AP": 20.0}))
        table = tables.main_table(tmp_path)
        assert table.loc["student", "AP"] == "20.0"
        assert table.loc["student", "AP50"] == tables.NO_VALUE
        assert table.loc["+ QSKD", "AP50"] == tables.NOT_RUN
        ablation = tables.ablation_table(tmp_path, "qskd", {})
        assert ablation.loc["baseline (no KD)", "AP75"] == tables.NO_VALUE
        assert ablation.loc["full QSKD", "AP75"] == tables.NOT_RUN

    def test_empty_directory_renders(self, tmp_path):
        table = tables.main_table(tmp_path / "nothing", seeds=[1])
        assert (table["AP"] == tables.NOT_RUN).all()
        assert table.loc["+ QSKD", "seeds"] == "0/2"

    def test_bad_json_names_the_file(self, tmp_path):
        (tmp_path / "teacher.json").write_text("{oops")
        with pytest.raises(ValueError, match="teacher.json: invalid JSON"):
            tables.main_table(tmp_path)


class TestAblationTable:
    def test_rows_deltas_and_paper_columns(self, metrics):
        table = tables.ablation_table(metrics, "kd_detr", ABLATIONS)
        assert list(table.index) == [
            "full KD-DETR",
            "w/o general points",
            "w/o FG re-balance",
            "kd_detr_t5 (distill.kd_detr.temperature=5)",
            "baseline (no KD)",
        ]
        assert table.loc["full KD-DETR", "AP"] == "24.0"
        assert table.loc["w/o general points", "AP"] == "23.5"
        assert table.loc["w/o general points", "AP50"] == "43.5"
        assert table.loc["w/o general points", "Δ AP"] == "-0.5"
        assert table.loc["kd_detr_t5 (distill.kd_detr.temperature=5)", "Δ AP"] == "+0.2"
        assert table.loc["w/o FG re-balance", "AP"] == tables.NOT_RUN
        assert table.loc["w/o FG re-balance", "Δ AP"] == ""
        assert table.loc["baseline (no KD)", "Δ AP"] == "-4.0"
        # KD-DETR Table 6 (methods.md §3.7): full 41.4, without general points 40.2, baseline 36.2
        assert table.loc["full KD-DETR", "paper AP"] == "41.4"
        assert table.loc["w/o general points", "paper AP"] == "40.2"
        assert table.loc["w/o general points", "paper Δ"] == "-1.2"
        assert table.loc["baseline (no KD)", "paper Δ"] == "-5.2"
        assert table.loc["w/o FG re-balance", "paper AP"] == ""  # not in the paper's table

    def test_method_without_paper_numbers_and_missing_full_run(self, metrics):
        table = tables.ablation_table(metrics, "detrdistill", ABLATIONS)
        assert list(table.index) == ["full DETRDistill", "w/o QPAD", "baseline (no KD)"]
        assert table.loc["full DETRDistill", "AP"] == tables.NOT_RUN
        assert table.loc["baseline (no KD)", "Δ AP"] == ""  # no full run to compare with
        assert table.loc["w/o QPAD", "paper AP"] == "44.3"
        qskd = tables.ablation_table(metrics, "qskd", ABLATIONS)
        assert (qskd["paper AP"] == "").all()  # QSKD's ablation was not retrieved
        assert qskd.loc["w/o GQS", "AP"] == tables.NOT_RUN

    @pytest.mark.parametrize(
        ("overrides", "part"),
        [
            ("distill.qskd.gqs=false", "gqs"),
            ("distill.qskd.gqs=False", "gqs"),
            ("distill.qskd.gqs=true", None),
            ("distill.qskd.tau=0.5", None),
            ("distill.kd_detr.general=false", None),  # another method's key
            ("distill.qskd.gqs=false distill.qskd.lapd=false", None),
        ],
    )
    def test_ablation_part(self, overrides, part):
        assert tables.ablation_part("qskd", overrides) == part


class TestSweeps:
    def test_tau_sweep_values_main_row_and_gain(self, metrics):
        exp = Experiments(tau_sweep=(0.5, -0.5, 0.25))
        stats = tables.tau_stats(metrics, exp, tau=0.0)
        assert stats["tau"].tolist() == [-0.5, 0.0, 0.25, 0.5]
        assert stats["main"].tolist() == [False, True, False, False]
        assert stats.loc[stats["tau"] == 0.0, "AP"].item() == 25.0  # the main QSKD run
        assert stats.loc[stats["tau"] == 0.5, "gain"].item() == pytest.approx(6.0)  # over seed-0 baseline 20
        assert math.isnan(stats.loc[stats["tau"] == 0.25, "AP"].item())
        table = tables.sweep_table(stats)
        assert list(table.index) == ["-0.5", "0 (main)", "0.25", "0.5"]
        assert table.loc["0.25", "AP"] == tables.NOT_RUN
        assert table.loc["0.25", "gain"] == ""
        assert table.loc["-0.5", "AP75"] == "23.0"
        assert table.loc["-0.5", "gain"] == "+1.0"

    def test_points_sweep_skips_a_value_equal_to_the_main_run(self, metrics):
        stats = tables.points_stats(metrics, Experiments(points_sweep=(10, 50)), points=50)
        assert stats["general points"].tolist() == [10, 50]
        assert stats["AP"].tolist() == [22.0, 24.0]
        assert stats["found"].tolist() == [True, True]
        table = tables.sweep_table(stats)
        assert list(table.index) == ["10", "50 (main)"]
        assert table.loc["10", "AP"] == "22.0"
        assert table.loc["10", "AP50"] == tables.NO_VALUE  # recorded without AP50: not "not run"
        assert table.loc["50 (main)", "AP50"] == "44.0"


def test_run_dirs_lists_existing_runs(tmp_path):
    exp = Experiments(seeds=(1,), ablations={"a": ("qskd", "")}, tau_sweep=(0.5,), points_sweep=(10,))
    for run in ("student_none", "seed1_qskd", "ablation_a", "tau_0.5"):
        (tmp_path / run).mkdir()
    dirs = tables.run_dirs(exp, tmp_path)
    assert dirs["main"] == {"student": tmp_path / "student_none"}
    assert dirs["seeds"] == {"+ QSKD seed 1": tmp_path / "seed1_qskd"}
    assert dirs["ablations"] == {"a": tmp_path / "ablation_a"}
    assert dirs["tau sweep"] == {"tau = 0.5": tmp_path / "tau_0.5"}
    assert dirs["points sweep"] == {}


def test_paper_table_gains():
    paper = tables.paper_table()
    assert paper.loc[paper["method"] == "QSKD", "gain"].tolist() == ["+4.1"]
    assert paper.loc[(paper["method"] == "KD-DETR") & (paper["student"] == "R18"), "gain"].tolist() == [
        "+5.2"
    ]


def test_write_tables_markdown_keeps_signs_and_html_is_self_contained(tmp_path, metrics):
    main = tables.main_table(metrics, seeds=[1, 2])
    frames = {"Main": main, "Extra": pd.DataFrame({"x": ["+1.0"]}, index=["r"])}
    tables.write_tables(frames, tmp_path / "out" / "t.md", tmp_path / "out" / "t.html")
    md = (tmp_path / "out" / "t.md").read_text()
    assert "## Main" in md and "## Extra" in md
    assert "27.0 ± 2.0" in md
    assert "+6.0" in md and "+1.0" in md  # signed strings are not re-parsed as numbers
    html = (tmp_path / "out" / "t.html").read_text()
    assert html.startswith("<!doctype html>") and "<h2>Main</h2>" in html and "27.0 ± 2.0" in html
    assert "src=" not in html
