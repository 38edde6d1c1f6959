"""Preflight: everything checked and resolved before any process, Ray node or run dir exists.

`make_plan` turns a loaded Config into a Plan (data resolved to absolute shard paths, model args
checked, shards per worker, steps); a failure here is a ConfigError: exit 2, nothing started.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline import config as config_mod
from pipeline import imports, models, secrets, tasks
from pipeline.checkpoint import commit, store, trust
from pipeline.config import Config, ConfigError
from pipeline.data import shards
from pipeline.data.stream import check_first_sample, check_shard_count, shards_per_rank
from pipeline.launch import environments, text
from pipeline.training import activations, finetune


class TrainingFailed(RuntimeError):
    """Training started and failed (after Ray's retries): exit 1."""


AUTO_NOTE = " (bf16 if every worker's device computes it natively, else fp32)"


@dataclass
class Plan:
    cfg: Config
    spec: shards.DataSpec
    params_trainable: int
    params_frozen: int
    resume_from: Path | None = None
    resume_target: store.ResumeTarget | None = None  # resume=PATH: what it rolls back (set aside at start)
    checkpointed_blocks: list[str] = field(default_factory=list)  # model.activation_checkpointing

    @property
    def world_size(self) -> int:
        return self.cfg.cluster.num_workers

    @property
    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world_size

    def shards_per_worker(self) -> list[int]:
        """Train shards each worker's loader processes read in the first epoch: the stream's own split,
        by reader (worker x loader process), so 12 shards on 2 workers x 4 processes are [8, 4]."""
        return shards_per_rank(self.spec, self.cfg.data, self.world_size, self.cfg.seed)

    def _rollback_note(self) -> str:
        target = self.resume_target
        if target is None or not target.newer:
            return ""
        return (
            f"; rolls back to step {target.step}: the newer {', '.join(target.newer)} will be moved to "
            f"{self.cfg.checkpoint_dir}/abandoned-<time>/ (kept, never resumed)"
        )

    def _data_lines(self) -> list[str]:
        cfg, spec = self.cfg, self.spec
        if spec.kind == "environment":
            return environments.describe(cfg, spec, self.world_size)
        epochs = ""
        if spec.train_samples:
            epochs = f" (~{cfg.train.max_steps * self.samples_per_step / spec.train_samples:.1f} epochs)"
        shape = f"input {tuple(spec.sample_shape)}, {spec.num_classes} classes"
        if spec.kind == "tokens":
            shape = (
                f"token windows of {spec.sample_shape[0] - 1} (+1 target), {spec.vocab} vocabulary of "
                f"{spec.num_classes}"
            )
        return [
            f"data          {len(spec.train_urls)} train shard(s) ({spec.train_samples or '?'} samples), "
            f"{len(spec.val_urls)} val shard(s) ({spec.val_samples or '?'} samples), "
            f"{shape}",
            f"shards/worker {self.shards_per_worker()} "
            f"(each split over {max(1, cfg.data.num_workers)} loader process(es))",
            f"steps         {cfg.train.max_steps} x {self.samples_per_step} samples "
            f"({cfg.data.batch_size}/worker x {cfg.train.grad_accum} accum x {self.world_size}){epochs}",
        ]

    def _checkpointing(self) -> str:
        blocks = self.checkpointed_blocks
        if not blocks:
            return ""
        shown = ", ".join(blocks[:4]) + (f" ... ({len(blocks)} in all)" if len(blocks) > 4 else "")
        return f"; activation checkpointing: {shown}"

    def _compiling(self) -> str:
        options = self.cfg.train.compile_options
        if not options:
            return ""
        dynamic = "" if options["dynamic"] is None else f", dynamic={str(options['dynamic']).lower()}"
        return f"; torch.compile (mode {options['mode']}{dynamic}; the first step compiles)"

    def describe(self) -> str:
        cfg = self.cfg
        lines = [
            f"run dir       {cfg.resolved_run_dir}",
            f"launcher      {cfg.cluster.launcher}, {self.world_size} worker(s) x "
            f"{cfg.cluster.cpus_per_worker} CPU{', GPU' if cfg.cluster.use_gpu else ''}"
            f"{', cluster ' + cfg.cluster.address if cfg.cluster.address else ''}",
            f"model         {cfg.model.name} {cfg.model.args or ''}: {self.params_trainable:,} trainable, "
            f"{self.params_frozen:,} frozen parameters{self._checkpointing()}",
            f"task          {cfg.task.name} {cfg.task.args or ''}"
            + "".join(f"; {engine}: {keys}" for engine, keys in cfg.task.optim.items()),
            f"precision     {cfg.precision}{AUTO_NOTE if cfg.precision == 'auto' else ''}"
            f", ZeRO stage {cfg.zero.stage}"
            f"{' + optimizer offload' if cfg.zero.offload_optimizer else ''}"
            f"{' + param offload' if cfg.zero.offload_params else ''}{self._compiling()}",
            f"optimizer     {cfg.optim.name} lr={cfg.optim.lr:g} wd={cfg.optim.weight_decay:g} "
            f"{cfg.optim.schedule} schedule, {cfg.optim.warmup_steps} warmup steps",
            *self._data_lines(),
            f"resume        {f'from {self.resume_from}' if self.resume_from else 'fresh start'}"
            f"{self._rollback_note()}",
            f"eval          every {cfg.train.eval_every or 'end'}; checkpoint every "
            f"{cfg.checkpoint.every or 'end'} (keep {cfg.checkpoint.keep_last}) in "
            f"{store.for_config(cfg).describe()}",
        ]
        return "\n".join(lines)


def _absolute(cfg: Config) -> Config:
    """Workers may run in another cwd (Ray workers, a Ray job's working dir, a Slurm job): ship
    absolute local paths."""
    tree = cfg.to_dict()
    tree["run_dir"] = str(cfg.resolved_run_dir.resolve())
    if cfg.checkpoint.dir and "://" not in cfg.checkpoint.dir:
        tree["checkpoint"]["dir"] = str(Path(cfg.checkpoint.dir).resolve())
    if cfg.task.score_classifier:
        tree["task"]["score_classifier"] = os.path.abspath(cfg.task.score_classifier)
    if cfg.init_from.path:  # always a local file or dir (weights.load_weights)
        tree["init_from"]["path"] = os.path.abspath(cfg.init_from.path)
    for key in ("train", "val"):
        value = tree["data"][key]
        if value and not shards.is_remote(value):
            tree["data"][key] = os.path.abspath(value)
    for section, key in USER_CODE_KEYS:  # `path/to/file.py:Name`: absolute; `pkg.mod:Name`: as given
        if tree[section][key]:
            tree[section][key] = imports.absolute(tree[section][key])
    return config_mod.from_dict(tree)


# The config keys that may name users' code by import path (pipeline/imports.py).
USER_CODE_KEYS = (("model", "name"), ("task", "name"), ("data", "decode"))


def user_code(cfg: Config) -> dict[str, str]:
    """{config key: import path} of the users' code the config names (model, task, decode function)."""
    named = {f"{section}.{key}": getattr(getattr(cfg, section), key) for section, key in USER_CODE_KEYS}
    return {key: path for key, path in named.items() if path and imports.is_import_path(path)}


def installed_dirs() -> set[Path]:
    """Where installed packages and the standard library live (not users' code to ship)."""
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return {Path(d).resolve() for d in dirs}


def user_code_roots(cfg: Config) -> list[str]:
    """The sys.path entries the users' modules of `cfg` are imported from (imported here first, as the
    preflight does), which workers put on their own sys.path to import them the same way. Installed
    packages (site-packages) are left out: every node runs the same environment."""
    paths = user_code(cfg)
    for key, path in paths.items():
        imports.load_object(path, key=key)  # already imported by the preflight: a dict lookup
    installed = installed_dirs()
    roots = imports.module_roots(list(paths.values()))
    return [root for root in roots if not any(Path(root).is_relative_to(d) for d in installed)]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resume_point(cfg: Config) -> Path | None:
    """Which checkpoint `resume` means: auto (newest verified, else fresh) | never | PATH (must verify).
    With checkpoints on object storage, the chosen one is downloaded into the local checkpoint dir."""
    where = store.for_config(cfg)
    try:
        if cfg.resume == "never":
            if where.has_commits():
                raise ConfigError(
                    f"config key 'resume': resume=never but {where.describe()} already holds checkpoints; "
                    "set another run_dir (or name) for a fresh run, or resume=auto to continue this one"
                )
            return None
        if cfg.resume == "auto":
            return store.continue_line(where, where.newest_verified(warn=_warn))
        path = store.resolve_path(cfg.resume, where)  # a checkpoint, or a run dir's newest commit
        if path is None:
            raise ConfigError(f"config key 'resume': no committed checkpoint at {cfg.resume}")
        commit.verify(path)
        trust.check_tree(path)  # a checkpoint from elsewhere: tensors only, else exit 2 naming the file
        return path
    except commit.CheckpointError as e:
        raise ConfigError(f"config key 'resume': {e}") from None


def resume_plan(cfg: Config) -> tuple[Path | None, store.ResumeTarget | None]:
    """The resume point, and for `resume=PATH` what it rolls back (store.resume_target): PATH loads
    exactly that commit, newer commits of this run are set aside when the run starts. Refuses (exit 2)
    a checkpoint another config wrote (check_same_training)."""
    point = resume_point(cfg)
    target = None
    if point is not None and cfg.resume not in ("auto", "never"):
        try:
            target = store.resume_target(store.for_config(cfg), point, warn=_warn)
        except commit.CheckpointError as e:
            raise ConfigError(f"config key 'resume': {e}") from None
        point = target.commit
    if point is not None:
        check_same_training(cfg, point)
    return point, target


def check_same_training(cfg: Config, ckpt: Path) -> None:
    """A checkpoint continues the training its config defined (store.DEFINING_KEYS): resuming one that
    another config wrote (a shared checkpoint.dir, a changed lr) is refused, naming the keys, unless
    checkpoint.allow_config_change=true. Checkpoints from before this check carry no record: allowed."""
    saved = commit.read_manifest(ckpt).get("training_config")
    if not isinstance(saved, dict):
        return
    changes = store.config_changes(saved, store.training_config(cfg.to_dict()))
    if not changes:
        return
    if cfg.checkpoint.allow_config_change:
        _warn(f"resuming {ckpt} with a changed config (checkpoint.allow_config_change): {'; '.join(changes)}")
        return
    raise ConfigError(
        f"config key 'resume': checkpoint {ckpt} was written by another config; it differs in "
        f"{'; '.join(changes)}. Use another run_dir (or checkpoint.dir) for this config, or set "
        "checkpoint.allow_config_change=true to continue these weights with the new values"
    )


def check_task(cfg: Config, task: Any, model: Any) -> None:
    """That the model has the parts the task trains, and per-engine optimizer keys."""
    try:
        parts = task.split(model)
    except AttributeError:
        raise ConfigError(
            f"config key 'task.name': task '{cfg.task.name}' trains {', '.join(task.ENGINES)}, which model "
            f"'{cfg.model.name}' does not have (e.g. task gan needs model.name=dcgan)"
        ) from None
    if not isinstance(parts, dict) or list(parts) != list(task.ENGINES):
        got = list(parts) if isinstance(parts, dict) else type(parts).__name__
        raise ConfigError(
            f"config key 'task.name': {type(task).__name__}.split(model) must return {{engine: module}} "
            f"for its ENGINES {list(task.ENGINES)}, in that order; it returned {got}"
        )
    if not all(isinstance(part, nn.Module) for part in parts.values()):
        raise ConfigError(f"config key 'task.name': {type(task).__name__}.split(model) returned a non-module")
    for engine in cfg.task.optim:
        if engine not in task.ENGINES:
            raise ConfigError(
                f"config key 'task.optim.{engine}': task '{cfg.task.name}' has no engine '{engine}' "
                f"(its engines: {', '.join(task.ENGINES)})"
            )
    if cfg.task.score_classifier and cfg.task.name != "gan":
        raise ConfigError("config key 'task.score_classifier': only task gan scores samples")
    if cfg.task.score_classifier and commit.find(Path(cfg.task.score_classifier)) is None:
        _warn(
            f"task.score_classifier: no checkpoint at {cfg.task.score_classifier}, so no eval/digit_score; "
            "train the classifier first (e.g. `pipeline train configs/cnn-mnist5k.yaml`)"
        )
        cfg.task.score_classifier = None  # cfg is the plan's own copy (see _absolute)
    if cfg.task.score_classifier:  # a checkpoint from elsewhere: tensors only, else exit 2 naming the file
        try:
            trust.check_tree(commit.find(Path(cfg.task.score_classifier)) / "engines")
        except commit.CheckpointError as e:
            raise ConfigError(f"config key 'task.score_classifier': {e}") from None


def check_best_metric(cfg: Config, task: Any) -> None:
    """That the metric `checkpoint.keep_best` ranks by is one the task logs (its eval/ metrics are
    known without data); the task's own default may go unlogged while keep_best is 0."""
    metric, _ = tasks.best_of(task, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode)
    if not metric.startswith("eval/") or (
        cfg.checkpoint.best_metric is None and not cfg.checkpoint.keep_best
    ):
        return
    logged = tasks.eval_metric_names(task, scored=bool(cfg.task.score_classifier))
    if logged is None or metric in logged:
        return
    key = "checkpoint.best_metric" if cfg.checkpoint.best_metric else "checkpoint.keep_best"
    hint = " (or task.score_classifier, which logs eval/digit_score)" if cfg.task.name == "gan" else ""
    raise ConfigError(
        f"config key '{key}': task '{cfg.task.name}' never logs {metric}, so no checkpoint could rank "
        f"as best; it logs {', '.join(logged)}: set checkpoint.best_metric to one of them{hint}"
    )


def check_deepspeed(cfg: Config) -> None:
    """A raw `deepspeed` section as DeepSpeed validates it, and NVMe offload only where DeepSpeed can
    do it: checked here, where the workers would fail at start (deepspeed imported only then)."""
    if not cfg.deepspeed:
        return
    from pipeline import engine

    precision = "fp32" if cfg.precision == "auto" else cfg.precision
    merged = engine.deepspeed_config(
        micro_batch_size=cfg.data.batch_size,
        train=cfg.train,
        precision=precision,
        zero=cfg.zero,
        raw=cfg.deepspeed,
    )
    if problem := engine.deepspeed_config_problem(merged):
        raise ConfigError(f"config key 'deepspeed': DeepSpeed refuses it: {problem}")
    nvme = [part for part, device in cfg.offloaded().items() if device == "nvme"]
    if nvme and (problem := engine.async_io_problem()):
        raise ConfigError(
            f"config key 'deepspeed.zero_optimization.{nvme[0]}': device nvme: {problem}; or offload "
            "to memory (device: cpu)"
        )


def check_compile(cfg: Config) -> None:
    """train.compile where torch.compile can work on the workers (engine.compile_problem)."""
    if not (options := cfg.train.compile_options):
        return
    from pipeline import engine

    if problem := engine.compile_problem(options, use_gpu=cfg.cluster.use_gpu):
        raise ConfigError(f"config key 'train.compile': {problem}")


def shard_spec(cfg: Config, task: Any) -> shards.DataSpec:
    """The shards of a task that reads them, resolved and their first sample decoded."""
    if cfg.env.id is not None:
        raise ConfigError(
            f"config key 'env.id': task '{cfg.task.name}' reads shards (data.train); env.* configures "
            "the environments of an environment task (task.name: ppo): remove env.id"
        )
    if cfg.data.train is None:
        raise ConfigError(
            "config key 'data.train' is required: a dir written by `pipeline data prepare` or `pipeline "
            "data index`, or shard URLs (or, for reinforcement learning, task.name=ppo with env.id)"
        )
    spec = shards.resolve(
        cfg.data.train,
        cfg.data.val,
        cfg.data.storage_options,
        missing_ok=cfg.data.on_error == "skip",
        image_size=cfg.data.image_size,
        allow_manifest_pipe=cfg.data.allow_manifest_pipe,
    )
    check_shard_count(spec, cfg.cluster.num_workers, cfg.data.num_workers)
    text.check_token_task(cfg, task, spec)
    check_first_sample(spec, cfg.data)  # a wrong data.fields / data.decode fails here: exit 2
    if task.needs_labels and spec.num_classes == 0:  # found now, not as a cross-entropy error mid-run
        raise ConfigError(
            f"config key 'task.name': task '{cfg.task.name}' trains on labels, but data.train has none (its "
            "MANIFEST records no target): index it with `pipeline data index ... --target KEY`, or use a "
            "task without labels (autoencoder, vae, gan, next_step)"
        )
    return spec


def make_plan(cfg: Config) -> Plan:
    cfg = _absolute(cfg)
    check_deepspeed(cfg)
    check_compile(cfg)
    task = tasks.build(cfg.task.name, cfg.task.args)
    # an environment task's unknown ids and spaces are exit 2 naming env.id, as shards are data.train
    is_env = task.source == "environment"
    spec = environments.environment_spec(cfg) if is_env else shard_spec(cfg, task)
    model = models.build(
        cfg.model.name,
        cfg.model.args,
        spec.sample_shape,
        task.num_outputs(spec.num_classes),
        action_space=spec.action_space,
    )
    if is_env:
        environments.check_policy(cfg, model, spec)
    if spec.kind == "tokens":
        text.check_language_model(cfg, task, model, spec)
    check_task(cfg, task, model)
    checkpointed = activations.blocks(model, cfg.model.activation_checkpointing)  # patterns: exit 2
    check_best_metric(cfg, task)
    finetune.apply_init(model, cfg.init_from)  # a file that does not fit is a usage error: exit 2
    finetune.freeze(model, cfg.init_from)
    trainable, frozen = models.count_parameters(model)
    resume_from, target = resume_plan(cfg)
    return Plan(
        cfg=cfg,
        spec=spec,
        params_trainable=trainable,
        params_frozen=frozen,
        resume_from=resume_from,
        resume_target=target,
        checkpointed_blocks=checkpointed,
    )


def prepare_run_dir(plan: Plan) -> Path:
    """Create the run dir and write the resolved config (the first side effect of `pipeline train`)."""
    run_dir = plan.cfg.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # 0600 (credentials are `***` in it, but not the endpoint, bucket and paths around them)
    secrets.write_private(run_dir / "config.yaml", config_mod.dump_yaml(plan.cfg))
    if plan.resume_target is not None:  # resume=PATH: newer commits aside, the rollback recorded
        record = store.apply_resume_target(store.for_config(plan.cfg), plan.resume_target, plan.cfg.resume)
        if record and record["abandoned"]:
            print(
                f"resume={plan.cfg.resume}: rolled back to step {record['step']}; the newer checkpoints "
                f"{', '.join(record['abandoned'])} were moved to {record['moved_to']} (kept: never resumed "
                "or deleted by a run; delete them once you are sure). This line continues as tracking run "
                f"{record['run_id']}: metrics.jsonl holds it (the abandoned rows go to "
                "metrics.<old run id>.jsonl); W&B cannot rewrite steps, so it gets a new run.",
                file=sys.stderr,
                flush=True,
            )
    return run_dir


def worker_payload(plan: Plan, run_id: str) -> dict[str, Any]:
    """What each worker receives: plain dicts, cheap to pickle and identical on every rank."""
    return {
        "config": plan.cfg.to_dict(),
        "spec": plan.spec.to_dict(),
        "run_id": run_id,
        "launch_id": uuid.uuid4().hex,  # tells a Ray restart of the same launch from a new launch
        "resume_from": str(plan.resume_from.resolve()) if plan.resume_from else None,
        # where the driver found the users' modules: every worker imports them from there (another
        # cwd, a notebook's sys.path that Ray workers do not inherit)
        "module_roots": user_code_roots(plan.cfg),
    }
