"""The typed config tree: YAML + dotted ``key=value`` overrides, validated once.

Every component receives only its slice (``cfg.data``, ``cfg.optim`` ...). Errors are
``ConfigError`` and name the dotted key; the CLI turns them into exit code 2 before anything
starts (no Ray, no W&B, no run dir).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline import secrets


class ConfigError(ValueError):
    """A user error in the config, overrides or inputs: exit code 2."""


# Upper bounds, far above any real run and far below what overflows: counters of samples (steps x
# batch x accumulation x workers) stay below 2**62 in int64 tensors, and timeouts stay within what
# datetime.timedelta and C++ millisecond counts hold.
MAX_BATCH = 2**20  # samples per worker per micro-step
MAX_STEPS = 2**40  # optimizer steps (35,000 years at one step per second)
MAX_GRAD_ACCUM = 2**16
MAX_WORKERS = 2**16
MAX_SAMPLES = 2**62  # train.max_steps x samples per step
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_IMAGE_SIDE = 2**14
MAX_SEED = 2**32 - 1


class Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored. allow_inf_nan=False: an lr
    # or a weight decay of .inf/.nan is a typo that would train NaNs, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(Section):
    crop_padding: int = Field(0, ge=0, description="random crop after zero-padding by this many pixels")
    hflip: bool = Field(False, description="random horizontal flip (not for digits!)")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.hflip


class FieldsConfig(Section):
    """Which keys of a WebDataset sample are the model's input and target (default: detected)."""

    input: str | None = Field(
        None, description="the input's key: png | jpg | jpeg | webp | npy | any extension, e.g. input.npy"
    )
    target: str | None = Field(
        None,
        description="the target's key: cls | label | target (an int), or json.FIELD for a field of the "
        "sample's .json, e.g. json.label",
    )


class DataConfig(Section):
    train: str | None = Field(
        None,
        description="dir with a MANIFEST (`pipeline data prepare` or `pipeline data index`), or shard URLs "
        "(brace patterns) listed in the MANIFEST beside them; required unless the task learns from "
        "environments (env.id)",
    )
    val: str | None = Field(None, description="val shards; defaults to the prepared dir's val split")
    batch_size: int = Field(64, gt=0, le=MAX_BATCH, description="samples per worker per micro-step")
    num_workers: int = Field(0, ge=0, le=1024, description="DataLoader processes per training worker")
    shuffle_buffer: int = Field(1000, ge=0, le=2**24, description="samples in the in-memory shuffle buffer")
    cache_mb: float = Field(
        0,
        ge=0,
        description="MB of decoded train samples each loader process keeps, so later epochs skip "
        "reading and decoding their shards (0: off); a small dataset fits whole",
    )
    on_error: Literal["strict", "skip"] = Field(
        "strict", description="strict: fail on the first bad sample; skip: skip and count bad samples"
    )
    max_skip_fraction: float = Field(
        0.01, ge=0, le=1, description="skip mode: abort once skipped > this x max(samples read, epoch size)"
    )
    ledger: bool = Field(False, description="write the sample keys each rank consumes per step")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    image_size: tuple[int, int] | None = Field(
        None, description=f"resize images to [H, W] when decoding (1 to {MAX_IMAGE_SIDE} pixels each)"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for s3:// etc. (e.g. endpoint_url, key, secret)"
    )
    fields: FieldsConfig = Field(default_factory=FieldsConfig)
    decode: str | None = Field(
        None,
        description="your decode function, 'package.module:function' or 'file.py:function': "
        "sample dict (key -> bytes) -> (input array or tensor, int target); replaces data.fields",
    )
    allow_manifest_pipe: bool = Field(
        False,
        description="run the `pipe:` shell command a data MANIFEST's root names (only for a MANIFEST you "
        "wrote or checked; pipe: URLs you give in data.train/data.val always run)",
    )

    @field_validator("image_size")
    @classmethod
    def _image_size_in_range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not all(1 <= side <= MAX_IMAGE_SIDE for side in v):
            raise ValueError(f"each side must be 1 to {MAX_IMAGE_SIDE} pixels, e.g. [28, 28]")
        return v


class ModelConfig(Section):
    name: str = Field(
        "cnn",
        description="a built-in model (cnn, resnet18, lstm ...) or your nn.Module: 'package.module:Class' "
        "or 'path/to/file.py:Class'",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="constructor arguments of the model")
    activation_checkpointing: bool | list[str] = Field(
        False,
        description="recompute activations in backward: true (the model's own blocks: ResNet residual "
        "blocks, LSTM/GRU layers) or module-name patterns such as ['encoder.*']; less memory, more compute",
    )


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    nesterov: bool = False
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of optim.lr")

    @field_validator("betas")
    @classmethod
    def _betas_in_0_1(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in v):
            raise ValueError("Adam's betas are decay rates: each in [0, 1), e.g. [0.9, 0.999]")
        return v


class CompileConfig(Section):
    """`train.compile: {mode, dynamic}`: torch.compile's own options (pipeline/engine.py compiles)."""

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode; reduce-overhead and max-autotune use CUDA graphs (a GPU only)",
    )
    dynamic: bool | None = Field(
        None, description="null: specialise on the first shapes, recompile dynamic on a change"
    )


class TrainConfig(Section):
    max_steps: int = Field(100, gt=0, le=MAX_STEPS, description="optimizer steps")
    grad_accum: int = Field(1, gt=0, le=MAX_GRAD_ACCUM, description="micro-batches per optimizer step")
    clip_grad_norm: float = Field(0.0, ge=0, description="0 disables clipping")
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    torch_threads: int = Field(0, ge=0, description="intra-op threads per worker; 0: cpus_per_worker")
    max_nonfinite_steps: int = Field(3, gt=0, description="consecutive NaN/Inf losses that abort the run")
    compile: bool | CompileConfig = Field(
        False,
        description="torch.compile the model(s) (inductor) under ZeRO 0-3: true, or {mode, dynamic}; "
        "the first step pays the compile time (startup event: compile_s)",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_setting(cls, v: Any) -> Any:
        # One message naming train.compile (a plain union would report each branch's failure)
        if isinstance(v, bool | CompileConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError("must be true, false or a mapping {mode: ..., dynamic: ...}")
        try:
            return CompileConfig.model_validate(v)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None

    @property
    def compile_options(self) -> dict[str, Any] | None:
        """torch.compile's keyword arguments when compiling, else None."""
        if self.compile is False:
            return None
        options = self.compile if isinstance(self.compile, CompileConfig) else CompileConfig()
        return options.model_dump()


class ZeroConfig(Section):
    stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False


class CheckpointConfig(Section):
    dir: str | None = Field(
        None,
        description="default: <run_dir>/checkpoints; an s3:// (fsspec) URL mirrors every commit there, "
        "with <run_dir>/checkpoints as the local staging copy and download cache",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for an s3:// dir (endpoint_url, key, secret...)"
    )
    async_save: bool = Field(
        True,
        description="write checkpoint files in the background; weights and optimizer state are copied "
        "during the next forward and backward, the loop waits only to stage module buffers",
    )
    max_commit_lag_steps: int = Field(
        1,
        ge=1,
        description="async saves are committed at most this many steps after their step (the loop waits "
        "for the rest of the write then); 1 keeps the steps a crash can lose to checkpoint.every",
    )
    every: int = Field(0, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_last: int = Field(3, gt=0)
    max_save_failures: int = Field(
        3, gt=0, description="consecutive failed saves (e.g. disk full) that abort"
    )
    keep_best: int = Field(0, ge=0, description="also keep the best N checkpoints by best_metric")
    best_metric: str | None = Field(
        None,
        description="a metric logged at eval steps; default: the task's own (eval/accuracy for classify, "
        "eval/recon_mse for autoencoder and vae, eval/next_step_mse for next_step, eval/digit_score for gan)",
    )
    best_mode: Literal["max", "min"] | None = Field(
        None, description="default: the task's mode for its own metric, else max"
    )
    allow_config_change: bool = Field(
        False,
        description="resume from a checkpoint that a different config wrote (its config digest differs "
        "in what defines the training); refused unless true",
    )


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled", "auto"] = "auto"
    project: str = "pipeline"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    job_type: str = "train"
    log_checkpoint: bool = Field(
        False,
        description="at the end, log the last checkpoint as a W&B model artifact by reference "
        "(file:// or s3:// URL; nothing is uploaded to W&B)",
    )


class TrackingConfig(Section):
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class InitFromConfig(Section):
    path: str | None = Field(
        None, description="our checkpoint or run dir, exported weights (.pt, .safetensors), or a weights file"
    )
    exclude: list[str] = Field(default_factory=list, description="key patterns not loaded, e.g. ['head.*']")
    freeze: list[str] = Field(
        default_factory=list, description="parameter patterns frozen, e.g. ['features.*']"
    )
    unfreeze_at_step: int = Field(
        0, ge=0, description="train the frozen parameters from this step on (0: never)"
    )
    lr_mult: dict[str, float] = Field(default_factory=dict, description="LR multipliers by parameter pattern")
    adapt_input_channels: bool = Field(
        True,
        description="when the file's first convolution has other input channels than the data (RGB "
        "weights, 1-channel data), adapt its filters (summed to 1 channel, else repeated) as timm does",
    )
    freeze_batchnorm: bool = Field(
        False,
        description="BatchNorm layers matched by init_from.freeze also stop updating their running "
        "statistics (they run in eval mode)",
    )


class TaskConfig(Section):
    name: str = Field(
        "classify",
        description="classify | next_step | autoencoder | vae | gan | ppo | language_model, or your "
        "pipeline.Task subclass: 'package.module:Class' or 'path/to/file.py:Class'",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="the task's constructor keyword arguments (see pipeline/tasks/)"
    )
    optim: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-engine optimizer keys over `optim`, e.g. {discriminator: {lr: 2e-4}} for a GAN",
    )
    score_classifier: str | None = Field(
        None, description="gan: a classifier checkpoint or run dir on the same data, for eval/digit_score"
    )
    score_samples: int = Field(500, gt=0, description="gan: generated samples per eval/digit_score")

    @field_validator("optim")
    @classmethod
    def _optim_keys(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for engine, keys in v.items():
            try:
                OptimConfig(**keys)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                close = difflib.get_close_matches(where, OptimConfig.model_fields, n=1)
                hint = f"; did you mean '{engine}.{close[0]}'?" if close else ""
                raise ValueError(f"key '{engine}.{where}': {first['msg']}{hint}") from None
        return v


class EnvConfig(Section):
    """Environments an environment task (task.name: ppo) learns from: every training worker steps
    `num_envs` copies of Gymnasium environment `id` (seeded per seed, rank and env index)."""

    id: str | None = Field(
        None, description="a registered Gymnasium id, e.g. CartPole-v1 (needs `pip install .[rl]`)"
    )
    num_envs: int = Field(4, ge=1, le=4096, description="environment copies per training worker")
    args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of gymnasium.make (e.g. g for Pendulum-v1)"
    )
    max_episode_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="episode time limit; default: the environment's own"
    )
    eval_episodes: int = Field(
        20, ge=1, le=100_000, description="episodes of the deterministic policy per evaluation"
    )

    @field_validator("id")
    @classmethod
    def _plain_id(cls, v: str | None) -> str | None:
        return None if v is None else _no_control_chars(v)


class ClusterConfig(Section):
    launcher: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Train workers; local: torch.multiprocessing, no Ray (debugging)"
    )
    num_workers: int = Field(2, gt=0, le=MAX_WORKERS)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    max_failures: int = Field(0, ge=0)
    address: str | None = Field(None, description="existing Ray cluster; default: start one in-process")
    node_ip: str | None = Field(None, description="address Ray nodes use; local cluster: 127.0.0.1")
    collective_timeout_s: int = Field(
        300, gt=0, le=MAX_TIMEOUT_S, description="a collective that waits longer fails (at most 7 days)"
    )
    worker_niceness: int = Field(
        0,
        ge=0,
        le=19,
        description="nice value of the Ray training workers (Ray's default is 15: then Ray's own "
        "processes and the driver preempt training on a busy node)",
    )


# What reaches an #SBATCH line: sbatch splits those at whitespace, and a newline would end the
# directives (dropping --requeue and --signal after it) and run the rest as shell. So each value keeps
# to the characters of Slurm's own syntax for its option, which need no quoting (launch/slurm.py).
_SLURM_WORD = r"[A-Za-z0-9._-]+"
SLURM_VALUES = {
    "partition": (rf"{_SLURM_WORD}(,{_SLURM_WORD})*", "comma-separated names: letters, digits, . _ -"),
    "account": (_SLURM_WORD, "an account name: letters, digits, . _ -"),
    "mem": (r"\d+[KMGTkmgt]?", "a size with an optional unit K, M, G or T, e.g. 64G"),
    "time": (
        r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|(?i:infinite|unlimited)",
        "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
    ),
}
# --option[=value] (or option[=value]); a value may hold a constraint expression, a gres, a path...
SBATCH_OPTION = re.compile(r"(?:--)?([a-z][a-z0-9-]*)(?:=([A-Za-z0-9._,:@%+=/*&|!\[\]()-]+))?")
# Options the pipeline sets itself: another value would silently replace ours (sbatch keeps the last).
SBATCH_OWN = {
    "job-name": "name",
    "nodes": "slurm.nodes",
    "ntasks-per-node": "(one Ray node per Slurm node)",
    "cpus-per-task": "slurm.cpus_per_task",
    "time": "slurm.time",
    "output": "run_dir (the log is RUN_DIR/slurm/job-%j.out)",
    "error": "run_dir (the log is RUN_DIR/slurm/job-%j.out)",
    "open-mode": "(append: every segment writes the same log)",
    "requeue": "(always: preemption requeues)",
    "no-requeue": "(preemption requeues)",
    "signal": "slurm.signal_lead_s",
    "partition": "slurm.partition",
    "account": "slurm.account",
    "gpus-per-node": "slurm.gpus_per_node",
    "mem": "slurm.mem",
}
_SBATCH_PREFIX_OPTIONS = {"ntasks", "gpus"}  # real options that are prefixes of one of ours


# Control characters but tab: a newline ends a shell line or an #SBATCH block, the others hide text.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _no_control_chars(v: str) -> str:
    if CONTROL_CHARS.search(v):
        raise ValueError("must not contain a newline or other control character")
    return v


def sbatch_option_owner(name: str) -> str | None:
    """The key that sets option `name` if the pipeline sets it itself; sbatch, like getopt, also takes
    an unambiguous prefix (--req is --requeue)."""
    if name in SBATCH_OWN:
        return SBATCH_OWN[name]
    if name in _SBATCH_PREFIX_OPTIONS:
        return None
    return next((key for own, key in SBATCH_OWN.items() if own.startswith(name)), None)


def time_limit_s(time: str) -> int | None:
    """Slurm's --time (SLURM_VALUES["time"]) in seconds; None: no limit (0, INFINITE, UNLIMITED)."""
    if time.lower() in {"infinite", "unlimited"}:
        return None
    days, dash, clock = time.partition("-") if "-" in time else ("0", "", time)
    fields = [int(f) for f in clock.split(":")]
    if dash:  # D-HH[:MM[:SS]]
        h, m, s = fields + [0] * (3 - len(fields))
    elif len(fields) == 3:  # HH:MM:SS
        h, m, s = fields
    else:  # MM[:SS]
        h, (m, s) = 0, fields + [0] * (2 - len(fields))
    return (((int(days) * 24 + h) * 60 + m) * 60 + s) or None


class SlurmConfig(Section):
    """`pipeline submit slurm`: the #SBATCH lines of slurm/ray-on-slurm.sbatch."""

    partition: str | None = Field(None, description="default: the cluster's default partition")
    nodes: int = Field(1, gt=0, description="one Ray head on the first node, one Ray worker on each other")
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(
        None, gt=0, description="CPUs per node for Ray; default: the workers' CPUs spread over the nodes"
    )
    mem: str | None = Field(None, description="memory per node, e.g. 64G")
    time: str = Field("01:00:00", description="wall-clock limit, [D-]HH:MM:SS")
    account: str | None = None
    signal_lead_s: int = Field(
        120,
        gt=0,
        le=65535,  # Slurm's limit for --signal
        description="USR1 this many seconds before the time limit (Slurm may send it up to a minute "
        "earlier): checkpoint, exit 75, requeue",
    )
    extra_sbatch: list[str] = Field(
        default_factory=list, description="more #SBATCH options, e.g. ['--qos=high', '--constraint=a100']"
    )
    setup: list[str] = Field(
        default_factory=list, description="shell lines run first in the job, e.g. ['module load cuda/12.4']"
    )
    python: str | None = Field(None, description="python on the nodes; default: the one that submits")

    @field_validator("time", mode="before")
    @classmethod
    def _time_is_text(cls, v: Any) -> Any:
        if isinstance(v, int):  # YAML reads 1:30:00 as 5400, which Slurm would take as minutes
            raise ValueError("write it as HH:MM:SS with two-digit hours (00:02:00), or quoted ('30')")
        return v

    @field_validator("partition", "account", "mem", "time")
    @classmethod
    def _slurm_syntax(cls, v: str | None, info: ValidationInfo) -> str | None:
        pattern, what = SLURM_VALUES[info.field_name]
        if v is not None and not re.fullmatch(pattern, v):
            raise ValueError(f"must be {what} (Slurm's syntax for --{info.field_name})")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _sbatch_options(cls, v: list[str]) -> list[str]:
        for entry in v:
            match = SBATCH_OPTION.fullmatch(entry)
            if not match or re.search("hetjob|packjob", entry, re.IGNORECASE):
                raise ValueError(
                    f"entry {entry!r} is not one long option --name[=value]: a value has letters, digits "
                    "and . _ , : @ % + = / * & | ! [ ] ( ) - (no spaces, quotes or #), and no hetjob"
                )
            if owner := sbatch_option_owner(match.group(1)):
                raise ValueError(f"entry {entry!r}: the pipeline sets --{match.group(1)} itself: {owner}")
        return v

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, v: list[str]) -> list[str]:
        for line in v:
            if CONTROL_CHARS.search(line):
                raise ValueError(f"entry {line!r}: one shell line per entry, without control characters")
        return v

    @field_validator("python")
    @classmethod
    def _python_path(cls, v: str | None) -> str | None:
        return v if v is None else _no_control_chars(v)

    @model_validator(mode="after")
    def _signal_before_the_limit(self) -> SlurmConfig:
        limit = time_limit_s(self.time)
        if limit is not None and self.signal_lead_s + 60 >= limit:
            raise ValueError(
                f"slurm.signal_lead_s ({self.signal_lead_s}) must be more than 60 s below slurm.time "
                f"({self.time} = {limit} s): Slurm may send the signal up to a minute early, and a job "
                "signalled before it trained would requeue forever"
            )
        return self


class Config(Section):
    name: str = "run"
    run_dir: str | None = Field(None, description="default: runs/<name>")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="0 to 2**32-1: numpy refuses negative seeds, and per-rank seeds derived from it "
        "(seed x 100003 + rank + 7919 x step) must fit torch's 64-bit generator",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: bf16 where every worker's device computes it natively (a bf16 GPU, a CPU with "
        "AVX-512 BF16/AMX), else fp32; the start summary says which and why",
    )
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config, merged last")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    resume: str = Field("auto", description="auto | never | PATH")
    init_from: InitFromConfig = Field(default_factory=InitFromConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_path_component(cls, v: str) -> str:
        if not v or "/" in v or v in {".", ".."}:
            raise ValueError("must be a non-empty name without '/' (it names the run dir)")
        return _no_control_chars(v)

    @model_validator(mode="after")
    def _combinations(self) -> Config:
        if self.precision == "fp16" and not self.cluster.use_gpu:
            raise ValueError(
                "precision=fp16 needs GPUs (dynamic loss scaling is a GPU feature); "
                "use precision=auto (or bf16/fp32) on CPU, or set cluster.use_gpu=true"
            )
        unfreeze, max_steps = self.init_from.unfreeze_at_step, self.train.max_steps
        warmup = self.optim.warmup_steps
        if unfreeze and not self.init_from.freeze:
            raise ValueError("config key 'init_from.unfreeze_at_step': needs init_from.freeze patterns")
        if unfreeze >= max_steps > 0 and unfreeze:
            raise ValueError(
                f"config keys 'init_from.unfreeze_at_step', 'train.max_steps': init_from.unfreeze_at_step "
                f"({unfreeze}) must be smaller than train.max_steps ({max_steps})"
            )
        if self.zero.offload_params and self.zero.stage != 3:
            raise ValueError(
                f"config key 'zero.offload_params': offload_params needs zero.stage=3 (parameter offload "
                f"is ZeRO-3's; got zero.stage={self.zero.stage})"
            )
        if self.zero.offload_optimizer and self.zero.stage == 0:
            raise ValueError("config key 'zero.offload_optimizer': needs zero.stage 1, 2 or 3")
        if warmup >= max_steps and warmup > 0:
            raise ValueError(
                f"config keys 'optim.warmup_steps', 'train.max_steps': optim.warmup_steps ({warmup}) must "
                f"be smaller than train.max_steps ({max_steps}); lower the warmup or train longer"
            )
        per_step = self.data.batch_size * self.train.grad_accum * self.cluster.num_workers
        if max_steps * per_step > MAX_SAMPLES:
            raise ValueError(
                "config keys 'train.max_steps', 'data.batch_size', 'train.grad_accum', "
                "'cluster.num_workers': train.max_steps x data.batch_size x train.grad_accum x "
                f"cluster.num_workers = {max_steps * per_step:.3g} samples, more than the 2**62 the "
                "run's sample counters hold"
            )
        self._check_offload()
        return self

    def _check_offload(self) -> None:
        """ZeRO offload as DeepSpeed gets it (zero.* with the raw `deepspeed` dict merged over it):
        DeepSpeed silently ignores parameter offload below stage 3, and NVMe offload without a path
        fails only in the workers."""
        raw = self.deepspeed.get("zero_optimization") or {}
        if not isinstance(raw, dict):
            raise ValueError("config key 'deepspeed.zero_optimization': must be a mapping")
        stage = raw.get("stage", self.zero.stage)
        for part in self.offloaded():
            section = raw.get(part) if isinstance(raw.get(part), dict) else {}
            if part == "offload_param" and stage != 3:
                raise ValueError(
                    f"config key 'deepspeed.zero_optimization.offload_param': parameter offload needs ZeRO "
                    f"stage 3 (DeepSpeed ignores it at stage {stage}); set zero.stage=3 or remove it"
                )
            if section.get("device") == "nvme" and not section.get("nvme_path"):
                raise ValueError(
                    f"config key 'deepspeed.zero_optimization.{part}': device nvme needs nvme_path (a "
                    "directory on a local NVMe drive)"
                )

    def offloaded(self) -> dict[str, str]:
        """{"offload_param" | "offload_optimizer": device} of what DeepSpeed will offload."""
        raw = self.deepspeed.get("zero_optimization") or {}
        own = {"offload_param": self.zero.offload_params, "offload_optimizer": self.zero.offload_optimizer}
        out = {}
        for part, on in own.items():
            section = raw.get(part) if isinstance(raw, dict) else None
            default = "cpu" if on else "none"  # ours; DeepSpeed's own default is none
            device = section.get("device", default) if isinstance(section, dict) else default
            if device != "none":
                out[part] = str(device)
        return out

    # Derived values live here so every component computes them the same way.
    def optim_for(self, engine: str) -> OptimConfig:
        """The optimizer config of one engine: `optim` with `task.optim.<engine>` over it."""
        return OptimConfig(**{**self.optim.model_dump(), **self.task.optim.get(engine, {})})

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    @property
    def checkpoint_remote(self) -> str | None:
        """The object-storage URL checkpoints are mirrored to, if `checkpoint.dir` is one."""
        dir_ = self.checkpoint.dir
        return dir_ if dir_ and "://" in dir_ and not dir_.startswith("file://") else None

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints are committed on a local (or shared) filesystem."""
        if self.checkpoint.dir and not self.checkpoint_remote:
            return Path(self.checkpoint.dir.removeprefix("file://"))
        return self.resolved_run_dir / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML-shaped dicts, credentials as `***` (pipeline.secrets): what every file,
        log, W&B config and payload gets; workers restore them from their environment."""
        tree = self.model_dump(mode="json")
        secrets.remember(tree)  # a Config built directly, not by load(): its credentials too
        return secrets.redact(tree)

    def digest(self) -> str:
        """A short hash of the resolved config (stored with checkpoints)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Keys whose values are free-form dicts: their sub-keys are not checked against the schema here
# (model.args is checked against the model's constructor by the models registry).
_FREE_FORM = {"deepspeed", "model.args", "data.storage_options"}


def _section_fields(cls: type[BaseModel]) -> dict[str, Any]:
    return cls.model_fields


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


# Sections that also accept a plain value, meaning one key of theirs: `init_from: PATH`.
_SHORTHAND = {"init_from": "path", "task": "name"}  # `task: gan` is short for `task: {name: gan}`


def _expand_shorthand(tree: dict[str, Any]) -> dict[str, Any]:
    for section, key in _SHORTHAND.items():
        if section in tree and not isinstance(tree[section], dict):
            tree[section] = {key: tree[section]}
    return tree


def _check_keys(data: dict[str, Any], cls: type[BaseModel], prefix: str, source: str) -> None:
    """Reject unknown keys with a did-you-mean, before type validation (pydantic's message lacks it)."""
    fields = _section_fields(cls)
    if not prefix:
        _expand_shorthand(data)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            candidates = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(candidates)}"
            raise ConfigError(f"unknown config key '{dotted}' ({source}){hint}")
        sub = _sub_model(fields[key].annotation)
        if sub is not None and dotted not in _FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{dotted}' ({source}) must be a section (mapping), got {value!r}"
                )
            _check_keys(value, sub, f"{dotted}.", source)


def _parent(tree: dict[str, Any], dotted: str, where: str) -> tuple[dict[str, Any], str]:
    """The dict that holds the last part of `dotted` (created on the way), and that part's name."""
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    return node, parts[-1]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node, leaf = _parent(tree, dotted, f"override '{dotted}'")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=3e-4`` -> ("optim.lr", 3e-4); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        # pydantic puts "Value error, " before the message of a ValueError raised by a validator
        message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if not key:  # a check across sections (Config._combinations): its message names the keys
            lines.append(message)
            continue
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"config key '{key}': {message}{got_text}")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def load(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config, apply dotted overrides, validate once. Raises ConfigError."""
    tree: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        tree = read_yaml(path)
        source = f"{Path(path)} + overrides" if overrides else str(Path(path))
    for text in overrides:
        key, value = parse_override(text)
        _check_keys(_nest(key, value), Config, "", f"override '{text}'")
        if key in _SHORTHAND and not isinstance(value, dict):
            key, value = f"{key}.{_SHORTHAND[key]}", value
        _set_dotted(tree, key, value)
    return _validate(tree, source)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _set_dotted(out, dotted, value)
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's tree, its keys checked (unknown keys with a did-you-mean). Raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}): "
            "save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    tree = loaded or {}
    _check_keys(tree, Config, "", str(p))
    return tree


def _section_at(dotted: str) -> type[BaseModel] | None:
    """The config section class at a dotted key (`train`, `tracking.wandb`); None for a plain value."""
    section: type[BaseModel] | None = Config
    for part in dotted.split("."):
        fields = _section_fields(section) if section is not None else {}
        section = _sub_model(fields[part].annotation) if part in fields else None
    return section


def merge(
    base: dict[str, Any], over: dict[str, Any], section: type[BaseModel] | None = None
) -> dict[str, Any]:
    """`over` merged into a copy of `base` (trees of `section`, default the whole Config): sections
    merge key by key; any other value replaces, a free-form dict such as model.args too (as
    `model.args={...}` does on the command line)."""
    fields = _section_fields(section or Config)
    out = copy.deepcopy(base)
    for key, value in over.items():
        sub = _sub_model(fields[key].annotation) if key in fields else None
        if sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, sub)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(
    tree: dict[str, Any], overrides: Mapping[str, Any], source: str = "overrides"
) -> dict[str, Any]:
    """Overrides given in Python, applied in order to a copy of the config tree `tree`: a dotted key
    sets that one key as `key=value` does on the command line (`{"train.max_steps": 50}`); a section's
    dict merges into it key by key (`{"train": {"max_steps": 50}}`, see `merge`). Each key is checked
    (unknown keys with a did-you-mean), errors labelled `source`."""
    out = _expand_shorthand(copy.deepcopy(tree))
    for key, value in overrides.items():
        _check_keys(_nest(key, copy.deepcopy(value)), Config, "", f"{source}: {key}")
        if key in _SHORTHAND and not isinstance(value, dict):  # `task: gan` is `task.name: gan`
            key = f"{key}.{_SHORTHAND[key]}"
        node, leaf = _parent(out, key, f"{source}: '{key}'")
        sub = _section_at(key)
        if sub is not None and isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = merge(node[leaf], value, sub)
        else:
            node[leaf] = copy.deepcopy(value)
    return out


def validate_tree(tree: dict[str, Any], source: str) -> Config:
    """A config tree built in Python (YAML-shaped dicts), checked as `load` checks a file: unknown
    keys with a did-you-mean, then types; errors name `source`. Raises ConfigError."""
    tree = copy.deepcopy(tree)
    _check_keys(tree, Config, "", source)
    return _validate(tree, source)


def _validate(tree: dict[str, Any], source: str) -> Config:
    # Credentials: `***` in a config this pipeline wrote comes back from the environment; credentials
    # in clear are recorded there for the processes this one starts (pipeline.secrets).
    secrets.restore(tree)
    secrets.remember(tree)
    if missing := secrets.unresolved(tree):
        raise ConfigError(
            f"config key '{missing[0]}' ({source}) is '{secrets.REDACTED}': a credential the pipeline "
            "redacted where it wrote this config, and this process was not given it (the process that "
            f"read it in clear passes it on in {secrets.ENV}). Give it again (in the config file or an "
            "override), or remove it and let fsspec/boto find credentials the standard way "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials)"
        )
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config (e.g. the resolved one shipped to workers)."""
    return _validate(tree, "dict")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
