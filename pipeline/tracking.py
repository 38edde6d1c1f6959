"""Where metrics and lifecycle events go: metrics.jsonl, events.jsonl, a progress display, and W&B.

The only wandb import. Only rank 0 tracks (`make_tracker(is_rank0=False)` returns a no-op tracker), so
a run never shows up once per worker.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import WandbConfig


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most the current line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=float) + "\n")

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


class Progress:
    """step/total, loss, samples/s and ETA. Redraws one line on a terminal; plain lines otherwise.

    Hand-written (a dozen lines) because rich/tqdm bars are useless where we mostly run: in Ray
    workers and Slurm jobs, stdout is a pipe or a file.
    """

    def __init__(self, total_steps: int, stream: Any = None) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start_time = time.monotonic()
        self.start_step: int | None = None

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.start_step is None:
            self.start_step, self.start_time = step - 1, now - 1e-9
        done = step - self.start_step
        eta = (now - self.start_time) / max(done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}"]
        for key in ("train/loss", "eval/loss", "eval/accuracy"):
            if key in metrics:
                parts.append(f"{key.split('/')[-1] if key.startswith('train') else key} {metrics[key]:.4f}")
        if "train/samples_per_s" in metrics:
            parts.append(f"{metrics['train/samples_per_s']:.0f} samples/s")
        parts.append(f"ETA {_format_duration(eta)}")
        line = " | ".join(parts)
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if step >= self.total_steps else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


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
    ) -> None:
        self.run_dir = run_dir
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl")
        self.events = JsonlWriter(run_dir / "events.jsonl")
        self.progress = Progress(total_steps)
        # After a crash, steps between the last commit and the crash were logged once already; they
        # are not logged again, so metrics.jsonl and W&B never see a step twice or go backwards.
        self.replayed_until = last_logged_step(run_dir / "metrics.jsonl")
        self.wandb_mode = resolve_wandb_mode(wandb_cfg)
        self.wandb_cfg = wandb_cfg
        self.name, self.run_id = name, run_id
        self._wandb = None
        if self.wandb_mode != "disabled":
            import wandb  # heavy: only when W&B is on

            self._wandb = wandb.init(
                **wandb_init_kwargs(wandb_cfg, self.wandb_mode, run_dir, config, run_id, name)
            )

    def log(self, step: int, metrics: dict[str, Any], show: bool = True) -> None:
        if step <= self.replayed_until:
            return  # a resumed run re-does steps the lost process already logged (with equal values)
        record = {"step": step, "time": time.time(), **metrics}
        self.metrics.write(record)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if show:
            self.progress.update(step, metrics)

    def event(self, kind: str, **fields: Any) -> None:
        self.events.write({"event": kind, "time": time.time(), **fields})

    def image(self, step: int, key: str, path: Path) -> None:
        """An image file (a sample grid) at `step`: a W&B media panel; in metrics.jsonl, its path."""
        if step <= self.replayed_until:
            return
        self.metrics.write({"step": step, "time": time.time(), key: str(path)})
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path), caption=f"step {step}")}, step=step)

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

    def close(self, summary: dict[str, Any] | None = None, checkpoint: str | None = None) -> None:
        """End of a segment: the run summary (final and best metrics, checkpoint paths, restarts) to
        W&B, the last checkpoint as an artifact (`tracking.wandb.log_checkpoint`), the sync hint."""
        if self._wandb is not None:
            segments = self.segments()
            self._wandb.summary.update({**(summary or {}), "segments": segments, "restarts": segments - 1})
            if checkpoint and self.wandb_cfg.log_checkpoint:
                self._log_checkpoint(checkpoint, (summary or {}).get("step"))
            offline_dir = self._offline_dir()
            self._wandb.finish()
            if self.wandb_mode == "offline":
                print(f"W&B offline run saved; upload it with: wandb sync {offline_dir}", flush=True)
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

    def location(self) -> str:
        return ""

    def close(self, summary: dict[str, Any] | None = None, checkpoint: str | None = None) -> None:
        pass


def make_tracker(
    is_rank0: bool,
    run_dir: Path,
    total_steps: int,
    wandb_cfg: WandbConfig,
    config: dict[str, Any],
    run_id: str,
    name: str,
) -> Tracker | NullTracker:
    if not is_rank0:
        return NullTracker()
    return Tracker(run_dir, total_steps, wandb_cfg, config, run_id, name)
