"""Where metrics and lifecycle events go: metrics.jsonl, events.jsonl, a progress display, and W&B.

The only wandb import. Only rank 0 tracks (`make_tracker(is_rank0=False)` returns a no-op tracker), so
a run never shows up once per worker.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline import secrets
from pipeline.config import WandbConfig


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most the current line."""

    def __init__(self, path: Path, private: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._private = private
        if private:  # 0600 (pipeline.secrets): e.g. events, whose errors may quote a path or a URL
            self._file = secrets.open_private(path, "a", buffering=1)
        else:
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=float)
        # private: records with error messages, which may quote a credential (an s3fs error)
        self._file.write((secrets.scrub(line) if self._private else line) + "\n")

    def close(self) -> None:
        self._file.close()


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def last_logged_step(path: Path) -> int:
    """The highest step in a metrics.jsonl (0 if none); a torn last line is ignored."""
    last = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return last


def wandb_records(path: Path) -> Iterator[Any]:
    """The records (`wandb_internal_pb2.Record`) of an offline W&B run file, `run-<id>.wandb`.

    Hand-written: wandb 0.31 no longer ships a reader. The file is a LevelDB-log-style stream: a
    7-byte header (`:W&B`, magic, version), then 32 KiB blocks of records, each behind a 7-byte header
    (crc32 u32, length u16 little-endian, type u8: 1 full, 2 first, 3 middle, 4 last); a block with
    less than 7 bytes left is padded. A torn tail (a killed writer) ends the stream."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            return
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # a torn record at the end of a killed segment
                return
            pending = b""
            yield record


def last_started_run_id(events_path: Path) -> str | None:
    """The run id of the last `start` event in events.jsonl (None if none)."""
    run_id = None
    if events_path.is_file():
        for line in events_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed process
            if isinstance(event, dict) and event.get("event") == "start":
                run_id = event.get("run_id")
    return run_id


def set_aside_other_line(run_dir: Path, run_id: str, resume_step: int) -> Path | None:
    """metrics.jsonl rows written by another run id belong to a line this run does not continue (a
    fresh start after lost or corrupt checkpoints, a rollback to an earlier commit): the file moves to
    metrics.<that id>.jsonl and the rows up to `resume_step`, the history both lines share, are copied
    back. Without this, every new step up to the old line's last one would be muted as a replay."""
    path = run_dir / "metrics.jsonl"
    if last_logged_step(path) == 0:
        return None
    previous = last_started_run_id(run_dir / "events.jsonl")
    if previous is None or previous == run_id:
        return None  # the same line (or nobody said): steps before its last commit are replayed silently
    aside = run_dir / f"metrics.{previous}.jsonl"
    if aside.exists():  # never over another set-aside file
        aside = run_dir / f"metrics.{previous}.{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= resume_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    os.replace(path, aside)
    path.write_text("".join(kept))
    return aside


def last_offline_wandb_step(run_dir: Path, run_id: str) -> int:
    """The highest step the earlier offline segments of W&B run `run_id` hold (0 if none). It can be
    below metrics.jsonl's: W&B writes in the background, and a killed process loses what it had not
    written yet."""
    last = 0
    for path in (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                last = max(last, int(record.history.step.num))
    return last


# How rank 0 shows progress (`Progress`); the launchers set it for their workers:
#   live   one bar redrawn in place (rich) on this process's stdout, a terminal
#   plain  one line per log step, for pipes, files, Slurm logs and tests
#   relay  one machine-readable line per log step, which the driver renders as the live bar (the Ray
#          launcher on a terminal: a worker's stdout reaches the user's terminal only as forwarded lines)
# Unset: live on a terminal, plain otherwise.
PROGRESS_ENV = "PIPELINE_PROGRESS"
PROGRESS_MODES = ("live", "plain", "relay")
# "1" (`pipeline train --verbose`): Ray's, DeepSpeed's and W&B's own console output too.
VERBOSE_ENV = "PIPELINE_VERBOSE"
RELAY_MARK = "@pipeline:progress "  # a relay line: this mark, then a JSON object


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _is_terminal(stream: Any) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def format_eta(seconds: float | None) -> str:
    """`--` until there is a rate to extrapolate from."""
    return "--" if seconds is None else _format_duration(seconds)


def _stats(metrics: dict[str, Any]) -> tuple[list[str], bool]:
    """The shown metrics of one log line, and whether it is an eval line."""
    parts = []
    for key in ("train/loss", "eval/loss", "eval/accuracy"):
        if key in metrics:
            parts.append(f"{key.split('/')[-1] if key.startswith('train') else key} {metrics[key]:.4f}")
    if "train/samples_per_s" in metrics:
        parts.append(f"{metrics['train/samples_per_s']:.0f} samples/s")
    return parts, any(key.startswith("eval/") for key in metrics)


class LiveBar:
    """One progress bar redrawn in place on a terminal; `print` puts a line above it."""

    def __init__(self, console: Any, redirect: bool = False) -> None:
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        self.console = console
        self._progress = RichProgress(
            TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[stats]}"),
            console=console,
            auto_refresh=False,  # redrawn on each update: nothing changes in between
            transient=False,  # the last state stays on screen
            redirect_stdout=redirect,
            redirect_stderr=redirect,
        )
        self._task: Any = None

    def update(self, step: int, total: int, stats: str) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task("", total=total, completed=step, stats=stats)
        else:
            self._progress.update(self._task, total=total, completed=step, stats=stats)
        self._progress.refresh()

    def print(self, line: str) -> None:
        from rich.text import Text

        # Text: no markup, so "[...]" in a forwarded line stays as it is; from_ansi keeps its colors
        self.console.print(Text.from_ansi(line), soft_wrap=True, highlight=False)

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None


class Progress:
    """step/total, loss, samples/s and ETA, shown the `PROGRESS_ENV` way (live, plain or relay)."""

    def __init__(self, total_steps: int, stream: Any = None, mode: str | None = None) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        mode = mode or os.environ.get(PROGRESS_ENV) or ("live" if _is_terminal(self.stream) else "plain")
        if mode not in PROGRESS_MODES:
            raise ValueError(f"{PROGRESS_ENV}={mode!r}: use one of {', '.join(PROGRESS_MODES)}")
        self.mode = mode
        self._first: tuple[int, float] | None = None  # the first update: where the rate is measured from
        self._bar: LiveBar | None = None

    def eta_s(self, step: int, now: float) -> float | None:
        """Seconds to `total_steps` at the rate since the first update (startup, compilation and the
        steps before a resume do not count); None at the first update, which has no rate yet."""
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        if step <= first_step or now <= first_time:
            return None
        return (now - first_time) / (step - first_step) * max(self.total_steps - step, 0)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        parts, is_eval = _stats(metrics)
        eta = f"ETA {format_eta(self.eta_s(step, time.monotonic()))}"
        line = " | ".join([f"step {step}/{self.total_steps}", *parts, eta])
        if self.mode == "plain":
            self.stream.write(line + "\n")
        elif is_eval:  # stays on screen above the bar (which shows the ETA)
            line = line.rsplit(" | ", 1)[0]
            if self.mode == "live":
                self._live_bar().print(line)
            else:
                self.stream.write(line + "\n")
        elif self.mode == "relay":
            record = {"step": step, "total": self.total_steps, "stats": " | ".join([*parts, eta])}
            self.stream.write(RELAY_MARK + json.dumps(record) + "\n")
        else:
            self._live_bar().update(step, self.total_steps, " | ".join([*parts, eta]))
        self.stream.flush()

    def _live_bar(self) -> LiveBar:
        if self._bar is None:
            from rich.console import Console

            # redirect: this process's own prints go above the bar instead of through it
            self._bar = LiveBar(Console(file=self.stream, force_terminal=True), redirect=True)
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ProgressRelay:
    """The driver's console while Ray workers run. Ray prints the workers' forwarded lines to this
    process's sys.stdout and sys.stderr, which go through here line by line: `divert(line)` may take
    a line off the console (it returns True: e.g. into a log file); with `live` (stdout is a
    terminal), relay lines move one live bar and every other line is printed above it."""

    def __init__(self, live: bool, divert: Callable[[str], bool] | None = None, console: Any = None) -> None:
        self._live, self._divert, self._console = live, divert, console
        self._lock = threading.RLock()
        self._bar: LiveBar | None = None
        self._saved: tuple[Any, Any] = (None, None)

    def __enter__(self) -> ProgressRelay:
        out, err = self._saved = sys.stdout, sys.stderr
        if self._live:
            from rich.console import Console

            self._bar = LiveBar(self._console or Console(file=out))
        self._err_on_bar = _is_terminal(err)  # stderr to a file stays there
        sys.stdout = _LineSink(lambda line: self.feed(line, is_err=False), out)
        sys.stderr = _LineSink(lambda line: self.feed(line, is_err=True), err)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sink in (sys.stdout, sys.stderr):
            if isinstance(sink, _LineSink):
                sink.flush_partial()
        sys.stdout, sys.stderr = self._saved
        with self._lock:
            if self._bar is not None:
                self._bar.close()

    def feed(self, line: str, is_err: bool = False) -> None:
        line = secrets.scrub(line)  # a worker's traceback may quote a credential
        with self._lock:
            if self._divert is not None and self._divert(line):
                return
            at = line.find(RELAY_MARK)
            record = _relay_record(line[at + len(RELAY_MARK) :]) if at >= 0 else None
            if self._bar is None or (is_err and not self._err_on_bar):
                stream = self._saved[1] if is_err else self._saved[0]
                if record is not None:
                    line = f"step {record['step']}/{record['total']} | {record['stats']}"
                stream.write(line + "\n")
                stream.flush()
            elif record is not None:
                self._bar.update(record["step"], record["total"], record["stats"])
            else:
                self._bar.print(line)


def _relay_record(text: str) -> dict[str, Any] | None:
    try:
        record = json.loads(text)
        return {"step": int(record["step"]), "total": int(record["total"]), "stats": str(record["stats"])}
    except (ValueError, KeyError, TypeError):
        return None  # not ours after all: shown as it came


class _LineSink(io.TextIOBase):
    """A text stream that hands each complete line to `feed` (the rest of the stream's API: `target`'s)."""

    def __init__(self, feed: Any, target: Any) -> None:
        self._feed, self._target, self._partial = feed, target, ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
        for line in lines:
            self._feed(line)
        return len(text)

    def flush_partial(self) -> None:
        with self._lock:
            partial, self._partial = self._partial, ""
        if partial:
            self._feed(partial)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        return _is_terminal(self._target)

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    """`auto`: online with an API key, otherwise offline (a laptop run never blocks on a login).
    WANDB_MODE in the environment wins, as W&B users expect."""
    env = os.environ.get("WANDB_MODE")
    if env in {"online", "offline", "disabled"}:
        return env
    if env == "dryrun":
        return "offline"
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_init_kwargs(
    cfg: WandbConfig, mode: str, run_dir: Path, config: dict[str, Any], run_id: str, name: str
) -> dict[str, Any]:
    """The arguments of `wandb.init`: the run id stored in the checkpoint and `resume="allow"`, so
    every segment of a run (restart, requeue, re-run) continues one W&B run instead of starting one."""
    return {
        "project": cfg.project,
        "entity": cfg.entity,
        "group": cfg.group,
        "tags": cfg.tags or None,
        "job_type": cfg.job_type,
        "name": name,
        "id": run_id,
        "resume": "allow",
        "mode": mode,
        "dir": str(run_dir),
        "config": config,
    }


class Tracker:
    """Rank 0's sinks. `log` for metrics at a step, `event` for lifecycle records."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        wandb_cfg: WandbConfig,
        config: dict[str, Any],
        run_id: str,
        name: str,
        resume_step: int = 0,
    ) -> None:
        self.run_dir = run_dir
        # before anything is appended: another line's rows would mute this one's steps
        self.set_aside = set_aside_other_line(run_dir, run_id, resume_step)
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl")
        self.events = JsonlWriter(run_dir / "events.jsonl", private=True)
        if self.set_aside is not None:
            self.event("metrics_set_aside", path=str(self.set_aside), kept_until_step=resume_step)
            print(
                f"note: metrics.jsonl held another run's steps (a fresh start or a rollback); they are in "
                f"{self.set_aside.name}, metrics.jsonl keeps the steps up to {resume_step}",
                flush=True,
            )
        self.progress = Progress(total_steps)
        # After a crash, steps between the last commit and the crash were logged once already; they
        # are not logged again, so metrics.jsonl and W&B never see a step twice or go backwards. Each
        # sink has its own mark: W&B may have lost steps that metrics.jsonl kept (see wandb_until).
        self.replayed_until = last_logged_step(run_dir / "metrics.jsonl")
        self.wandb_until = 0
        self.wandb_mode = resolve_wandb_mode(wandb_cfg)
        self.wandb_cfg = wandb_cfg
        self.name, self.run_id = name, run_id
        self._wandb = None
        self._closed = False
        if self.wandb_mode != "disabled":
            import wandb  # heavy: only when W&B is on

            if self.wandb_mode == "offline":  # read before this segment's own file exists
                self.wandb_until = last_offline_wandb_step(run_dir, run_id)
            secrets.private_dir(run_dir / "wandb")  # W&B's files: the config, argv, its debug logs
            self._wandb = wandb.init(
                **wandb_init_kwargs(wandb_cfg, self.wandb_mode, run_dir, config, run_id, name),
                # W&B's own banner and end-of-run summary stay in its log files (RUN_DIR/wandb/*/logs);
                # the start summary says where the run is, close() how to upload an offline one.
                settings=wandb.Settings(silent=not verbose()),
            )
            if self.wandb_mode == "online":  # a resumed run starts after the server's last step
                self.wandb_until = max(0, int(getattr(self._wandb, "starting_step", 0)) - 1)

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        # a resumed run re-does steps the lost process already logged (with equal values)
        if self._wandb is not None and step > self.wandb_until:
            self._wandb.log(metrics, step=step)
        if step <= self.replayed_until:
            return
        self.metrics.write({"step": step, "time": time.time(), **metrics})
        if show:
            self.progress.update(step, metrics)

    def event(self, kind: str, **fields: Any) -> None:
        self.events.write({"event": kind, "time": time.time(), **fields})

    def image(self, step: int, key: str, path: Path) -> None:
        """An image file (a sample grid) at `step`: a W&B media panel; in metrics.jsonl, its path."""
        if self._wandb is not None and step > self.wandb_until:
            import wandb

            self._wandb.log({key: wandb.Image(str(path), caption=f"step {step}")}, step=step)
        if step <= self.replayed_until:
            return
        self.metrics.write({"step": step, "time": time.time(), key: str(path)})

    def text(self, step: int, key: str, path: Path, rows: list[tuple[str, str]]) -> None:
        """Generated text at `step`: a W&B table (step, prompt, continuation); in metrics.jsonl, the
        path of the file that holds it."""
        if self._wandb is not None and step > self.wandb_until:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "continuation"])
            for prompt, continuation in rows:
                table.add_data(step, prompt, continuation)
            self._wandb.log({key: table}, step=step)
        if step <= self.replayed_until:
            return
        self.metrics.write({"step": step, "time": time.time(), key: str(path)})

    def location(self) -> str:
        """Where this run's dashboard is: the W&B URL, the offline dir to sync, or "disabled"."""
        if self._wandb is None:
            return "disabled (metrics.jsonl and events.jsonl only)"
        if self.wandb_mode == "online":
            return f"online, {self._wandb.url}"
        return f"offline, {self._offline_dir()} (upload later with `wandb sync`)"

    def _offline_dir(self) -> Path:
        return Path(self._wandb.dir).parent  # wandb/offline-run-<time>-<id>/files -> the run dir

    def segments(self) -> int:
        """How many times this run has started (first start, restarts, re-runs, requeues), from the
        `start` events of events.jsonl: restarts that died before a checkpoint count too."""
        starts = 0
        for line in (self.run_dir / "events.jsonl").read_text().splitlines():
            try:
                starts += json.loads(line).get("event") == "start"
            except ValueError:
                continue  # a torn line from a killed process
        return starts

    def close(
        self, summary: dict[str, Any] | None = None, checkpoint: str | None = None, failed: bool = False
    ) -> None:
        """End of a segment: the run summary (final and best metrics, checkpoint paths, restarts) to
        W&B, the last checkpoint as an artifact (`tracking.wandb.log_checkpoint`), the sync hint.
        Only the first call does anything (a run's own close with its summary, then the cleanup's).
        `failed`: the run raised; W&B records exit code 1 (the run shows as failed, not running)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.progress.close()
            if self._wandb is not None:
                segments = self.segments()
                self._wandb.summary.update(
                    {**(summary or {}), "segments": segments, "restarts": segments - 1}
                )
                if checkpoint and self.wandb_cfg.log_checkpoint:
                    self._log_checkpoint(checkpoint, (summary or {}).get("step"))
                offline_dir = self._offline_dir()
                self._wandb.finish(exit_code=1 if failed else 0)
                if self.wandb_mode == "offline":
                    print(f"W&B offline run saved; upload it with: wandb sync {offline_dir}", flush=True)
        finally:
            self.metrics.close()
            self.events.close()

    def _log_checkpoint(self, checkpoint: str, step: int | None) -> None:
        import wandb

        # By reference: W&B records the URL and the file list, the bytes stay where they are.
        url = checkpoint if "://" in checkpoint else Path(checkpoint).resolve().as_uri()
        artifact = wandb.Artifact(
            f"{self.name}-{self.run_id}-checkpoint", type="model", metadata={"step": step, "url": url}
        )
        artifact.add_reference(url, checksum=False)
        self._wandb.log_artifact(artifact, aliases=["latest", f"step_{step}"])
        self.event("checkpoint_artifact", url=url, step=step)


class NullTracker:
    """What every rank but 0 gets: the loop calls it unconditionally, nothing happens."""

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        pass

    def event(self, kind: str, **fields: Any) -> None:
        pass

    def image(self, step: int, key: str, path: Path) -> None:
        pass

    def text(self, step: int, key: str, path: Path, rows: list[tuple[str, str]]) -> None:
        pass

    def location(self) -> str:
        return ""

    def close(
        self, summary: dict[str, Any] | None = None, checkpoint: str | None = None, failed: bool = False
    ) -> None:
        pass


def make_tracker(
    *,
    is_rank0: bool,
    run_dir: Path,
    total_steps: int,
    wandb_cfg: WandbConfig,
    config: dict[str, Any],
    run_id: str,
    name: str,
    resume_step: int = 0,
) -> Tracker | NullTracker:
    if not is_rank0:
        return NullTracker()
    return Tracker(run_dir, total_steps, wandb_cfg, config, run_id, name, resume_step)
