"""`pipeline report` on a dir without metrics fails clearly (exit 2) and writes nothing."""

from tests.helpers import run_cli


def test_report_on_a_dir_without_metrics_is_a_usage_error(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2
    assert "has no metrics.jsonl" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_on_metrics_without_rows_is_a_usage_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2 and "no metrics rows yet" in proc.stderr
    assert not (tmp_path / "report.png").exists()
