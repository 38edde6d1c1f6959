"""What a user sees on the console: progress as plain lines or one live bar, the driver's relay of the
workers' lines, the CLI's completion options, the W&B offline hint once."""

import io
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline import tracking
from pipeline.config import WandbConfig
from pipeline.tracking import RELAY_MARK, Progress, ProgressRelay

TRAIN = {"train/loss": 1.25, "train/samples_per_s": 640.4}


@pytest.fixture
def clock(monkeypatch):
    """time.monotonic() of the tracking module, advanced by hand."""
    now = [100.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    return now


def terminal(out: io.StringIO) -> Console:
    return Console(file=out, force_terminal=True, width=120)


def test_plain_lines_keep_their_format_and_eta_waits_for_a_rate(clock):
    out = io.StringIO()
    progress = Progress(300, stream=out, mode="plain")
    progress.update(25, TRAIN)
    clock[0] += 5.0  # 25 steps in 5 s: 250 steps to go take 50 s
    progress.update(50, TRAIN)
    progress.update(50, {"eval/loss": 0.5, "eval/accuracy": 0.875})
    assert out.getvalue().splitlines() == [
        "step 25/300 | loss 1.2500 | 640 samples/s | ETA --",  # no rate yet: not "ETA 00:00"
        "step 50/300 | loss 1.2500 | 640 samples/s | ETA 00:50",
        "step 50/300 | eval/loss 0.5000 | eval/accuracy 0.8750 | ETA 00:50",
    ]


def test_plain_off_a_terminal_and_live_on_one_by_default(monkeypatch):
    monkeypatch.delenv(tracking.PROGRESS_ENV, raising=False)
    assert Progress(10, stream=io.StringIO()).mode == "plain"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert Progress(10, stream=Tty()).mode == "live"
    monkeypatch.setenv(tracking.PROGRESS_ENV, "relay")  # what the Ray launcher sets for its workers
    assert Progress(10, stream=Tty()).mode == "relay"
    monkeypatch.setenv(tracking.PROGRESS_ENV, "fancy")
    with pytest.raises(ValueError, match="PIPELINE_PROGRESS"):
        Progress(10)


def test_live_bar_redraws_one_line_in_place(clock, monkeypatch):
    out = io.StringIO()
    progress = Progress(300, stream=out, mode="live")
    monkeypatch.setattr(tracking, "LiveBar", lambda console, redirect: LiveBar(terminal(out), redirect))
    for step in range(25, 301, 25):
        clock[0] += 2.0
        progress.update(step, TRAIN)
    progress.close()
    text = out.getvalue()
    assert text.count("\n") == 1  # twelve updates, one line: ended when the bar closes
    assert text.count("\r\x1b[2K") >= 12  # each update: back to column 0, erase the line, redraw
    assert "step 25/300" in text and "ETA --" in text and "step 300/300" in text
    assert "loss 1.2500 | 640 samples/s | ETA 00:00" in text
    assert "step 25/300 | loss" not in text  # no plain lines


LiveBar = tracking.LiveBar


def test_live_bar_prints_eval_results_above_itself(clock, monkeypatch):
    out = io.StringIO()
    progress = Progress(300, stream=out, mode="live")
    monkeypatch.setattr(tracking, "LiveBar", lambda console, redirect: LiveBar(terminal(out), redirect))
    progress.update(100, TRAIN)
    progress.update(100, {"eval/accuracy": 0.9})
    progress.close()
    assert "step 100/300 | eval/accuracy 0.9000\n" in out.getvalue()  # a line of its own, kept


def test_relay_draws_the_workers_progress_as_one_bar_and_prints_other_lines_above(clock, monkeypatch):
    worker = io.StringIO()  # rank 0's stdout in a Ray worker (forwarded by Ray line by line)
    progress = Progress(300, stream=worker, mode="relay")
    for step in (25, 50, 75):
        clock[0] += 2.0
        progress.update(step, TRAIN)
    progress.update(75, {"eval/accuracy": 0.9})
    lines = worker.getvalue().splitlines()
    assert sum(RELAY_MARK in line for line in lines) == 3

    driver = io.StringIO()
    monkeypatch.setattr(sys, "stdout", driver)
    with ProgressRelay(live=True, console=terminal(driver)):
        print(lines[0])
        print("warning: checkpoint of step 30 not saved")  # another rank's warning, as Ray prints it
        for line in lines[1:]:
            sys.stdout.write(line[:10])  # Ray may hand over a line in pieces
            sys.stdout.write(line[10:] + "\n")
    assert sys.stdout is driver
    text = driver.getvalue()
    assert RELAY_MARK not in text
    assert "warning: checkpoint of step 30 not saved\n" in text
    assert "step 75/300 | eval/accuracy 0.9000\n" in text
    assert "step 75/300" in text and "ETA 00:18" in text  # the bar's last state, drawn in place
    assert text.count("\n") == 3  # the warning, the eval line and the bar's end: no line per update


def test_relay_off_a_terminal_prints_plain_lines_and_diverts_what_it_is_told(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    diverted = []

    def divert(line):
        if line.startswith("[ray]"):
            diverted.append(line)
            return True
        return False

    with ProgressRelay(live=False, divert=divert):
        print(RELAY_MARK + '{"step": 5, "total": 10, "stats": "loss 1.0000 | ETA --"}')
        print("[ray] chatter")
        print("error: boom", file=sys.stderr)
    assert out.getvalue() == "step 5/10 | loss 1.0000 | ETA --\n"
    assert err.getvalue() == "error: boom\n"  # stderr stays stderr
    assert diverted == ["[ray] chatter"]


def test_help_offers_shell_completion_and_train_verbose():
    from pipeline.__main__ import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0
    assert "--install-completion" in top.output and "--show-completion" in top.output
    train = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--verbose" in train.output


@pytest.mark.timeout(120)
def test_offline_wandb_run_is_quiet_and_its_sync_hint_printed_once(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite disables W&B; this test is about it
    monkeypatch.delenv(tracking.VERBOSE_ENV, raising=False)
    tracker = tracking.make_tracker(
        is_rank0=True,
        run_dir=tmp_path,
        total_steps=2,
        wandb_cfg=WandbConfig(mode="offline"),
        config={"seed": 0},
        run_id="quiet01",
        name="quiet",
    )
    tracker.event("start")
    tracker.log(2, {"train/loss": 0.5})
    tracker.close(summary={"step": 2})
    tracker.close()  # the run context's cleanup closes again: nothing more happens
    out, err = capfd.readouterr()
    assert (out + err).count("W&B offline run saved; upload it with: wandb sync") == 1
    assert "wandb:" not in out + err  # W&B's banner and summary block stay in its own logs
    assert "step 2/2 | loss 0.5000 | ETA --" in out
