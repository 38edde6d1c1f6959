"""Build DeepSpeed engines from config slices: the only deepspeed import of the training path.

One `Engine` wraps one `deepspeed.DeepSpeedEngine` (model + optimizer + LR schedule + ZeRO state).
Multi-model tasks (GANs) build several, each from its own slices.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import OptimConfig, TrainConfig, ZeroConfig
from pipeline.tracking import verbose


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def deepspeed_config(
    *,
    micro_batch_size: int,
    train: TrainConfig,
    precision: str,
    zero: ZeroConfig,
    raw: dict[str, Any],
) -> dict[str, Any]:
    """The DeepSpeed JSON config; `raw` (the `deepspeed` section) is merged last, for experts."""
    zero_section: dict[str, Any] = {"stage": zero.stage}
    if zero.stage >= 2:
        # overlap_comm only helps with a real interconnect; on gloo/CPU it just adds buffers.
        zero_section |= {"overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True}
    if norm_on_demand(zero, precision, train):
        zero_section["compute_grad_norm"] = False  # switched on at log steps: Engine.measure_grad_norm
    if zero.offload_optimizer:
        zero_section["offload_optimizer"] = {"device": "cpu"}
    if zero.offload_params:
        zero_section["offload_param"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": 0.0 if clips_locally(zero, precision, train) else train.clip_grad_norm,
        "zero_optimization": zero_section,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed checks that every rank saves under the same tag with two all-reduces per save,
        # on the loop's time; ours is always commit.ENGINE_TAG.
        "checkpoint": {"tag_validation": "Ignore"},
    }
    if zero.stage >= 1:
        # ZeRO partitions any torch optimizer's state; DeepSpeed only whitelists its Adam family and
        # refuses torch.optim.SGD as "untested" (it trains fine: tests/dist/test_recipes.py).
        cfg["zero_allow_untested_optimizer"] = True
    if zero.offload_optimizer:
        # We pass our own torch optimizer; DeepSpeed would otherwise insist on its CPU Adam.
        cfg["zero_force_ds_cpu_optimizer"] = False
    if precision == "bf16":
        # Mixed precision as autocast: fp32 master weights and BatchNorm statistics, bf16 compute.
        # DeepSpeed's "bf16" section casts the parameters but not BatchNorm buffers, which then fails
        # on CPU (`expected scalar type BFloat16 but found Float`; see ENVIRONMENT.md).
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _merge(cfg, raw)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def async_io_problem() -> str | None:
    """Why DeepSpeed cannot offload to NVMe on this machine, or None. Its async_io op is compiled at
    the first engine build and needs libaio; without it every worker fails there ("Unable to JIT load
    the async_io op"), after the run has started."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return "DeepSpeed's async_io op cannot be built on this machine (it needs libaio: apt install libaio-dev)"


def deepspeed_config_problem(ds_config: dict[str, Any]) -> str | None:
    """What DeepSpeed's own validation refuses in a DeepSpeed config (None: accepted). The preflight
    asks when the config has a raw `deepspeed` section: in the workers it fails with a raw traceback,
    after Ray, W&B and the run dir have started."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    # train_batch_size is checked against the real world size, which the workers have
    checked = {key: value for key, value in ds_config.items() if key != "train_batch_size"}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            DeepSpeedConfig(checked)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{e.title} {where}: {first['msg']}"
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU with bf16 (Ampere or newer), or a CPU
    with AVX-512 BF16 or AMX (an Arm CPU: its BF16 extension, as oneDNN reports it). Elsewhere bf16
    autocast is emulated: on an AVX2-only CPU several times slower than fp32, and oneDNN has no
    LSTM/GRU kernel for it at all (ENVIRONMENT.md)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    flags = _x86_cpu_flags()
    if flags is not None:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _x86_cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo on x86 Linux, else None. (torch 2.13 exposes no
    public probe for AVX-512 BF16; `_is_mkldnn_bf16_supported` is also true on AVX-512 CPUs that
    only emulate it.)"""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def choose_precision(requested: str, *, native: bool, device: str) -> tuple[str, str]:
    """(the precision to train in, why): `auto` is bf16 where every worker's device computes it
    natively (`native`, agreed over ranks), else fp32; an explicit choice is kept."""
    kind = "GPU" if device.startswith("cuda") else "CPU"
    if requested != "auto":
        return requested, "set in the config"
    if native:
        return "bf16", f"auto: every worker's {kind} computes bf16 natively"
    if kind == "GPU":
        return "fp32", "auto: not every worker's GPU supports bf16, so fp32"
    return "fp32", "auto: not every worker's CPU has AVX-512 BF16 or AMX, so fp32 (faster than emulated bf16)"


def forced_bf16_warning(precision: str, *, native: bool, device: str) -> str | None:
    """The warning for bf16 forced on hardware that only emulates it, or None."""
    if precision != "bf16" or native:
        return None
    kind = "GPU" if device.startswith("cuda") else "CPU"
    return (
        f"precision=bf16 on a {kind} without native bf16: expect several times fp32's step time, "
        "and torch's LSTM/GRU have no bf16 kernel there (oneDNN fails); precision=auto picks fp32 here"
    )


def clips_locally(zero: ZeroConfig, precision: str, train: TrainConfig) -> bool:
    """Whether `Engine.step` clips the gradients instead of DeepSpeed: under ZeRO-0 without fp16.
    DeepSpeed's clipping all-reduces the norm over the data-parallel group (for MoE experts, whose
    gradients differ between ranks): one more lock-step point per step, 2 ms of a 65 ms LSTM step on
    2 cores. Under ZeRO-0 every rank holds the same averaged gradients, so the local norm is the
    global one. (fp16: DeepSpeed's fp16 optimizer must clip the unscaled gradients itself.)"""
    return zero.stage == 0 and precision != "fp16" and train.clip_grad_norm > 0


def norm_on_demand(zero: ZeroConfig, precision: str, train: TrainConfig) -> bool:
    """Whether ZeRO-1/2 compute the gradient norm only when it is logged. Without clipping the norm
    is only a metric, but DeepSpeed computes it every step with one all-reduce per param group:
    ~3 ms of a 60 ms CNN step on 2 cores. (Clipping needs it every step; DeepSpeed refuses to skip
    it with optimizer offload, and fp16 keeps DeepSpeed's defaults.)"""
    return (
        zero.stage in (1, 2)
        and train.clip_grad_norm == 0
        and not zero.offload_optimizer
        and precision != "fp16"
    )


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_mult: dict[str, float] | None = None,
    delayed: list[str] | None = None,
    start_step: int = 0,
) -> list[dict[str, Any]]:
    """Parameter groups: weight decay on weight matrices/kernels only (not biases and norms); an LR
    multiplier per `lr_mult` pattern (first match); parameters named in `delayed` get LR 0 until
    `start_step` (frozen, yet in the optimizer). Groups carry `lr_mult` and `start_step` for the schedule."""
    from fnmatch import fnmatch

    groups: dict[tuple[float, bool, int], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((m for pattern, m in (lr_mult or {}).items() if fnmatch(name, pattern)), 1.0)
        starts = start_step if any(fnmatch(name, p) for p in delayed or []) else 0
        groups.setdefault((mult, param.ndim >= 2, starts), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            "lr_mult": mult,
            "start_step": starts,
        }
        for (mult, decays, starts), params in sorted(
            groups.items(), key=lambda kv: (-kv[0][1], kv[0][0], kv[0][2])
        )
    ]


def make_optimizer(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    groups = [{**g, "lr": optim.lr * g.get("lr_mult", 1.0)} for g in groups]
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim.lr, betas=optim.betas)


def _group_schedule(optim: OptimConfig, max_steps: int, start_step: int, updates_per_step: int = 1):
    """The LR multiplier of one parameter group by optimizer update; with several updates per loop
    step (an environment task's epochs x minibatches), constant within a loop step and scheduled over
    loop steps, as PPO anneals its LR per iteration."""

    def factor(update: int) -> float:
        step = update // updates_per_step
        return 0.0 if step < start_step else lr_factor(step, optim, max_steps)

    return factor


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


@dataclass
class Engine:
    """A named DeepSpeed engine. Call it like the module; `backward` + `step` once per micro-batch."""

    name: str
    ds: Any  # deepspeed.DeepSpeedEngine
    clip_grad_norm: float = 0.0  # > 0: `step` clips (see `clips_locally`), DeepSpeed does not
    # the last local clipping's norm (a tensor: no host sync)
    _grad_norm: torch.Tensor | None = field(default=None, init=False, repr=False)
    # the background writer of the last save: `step` waits for its deferred staging copies
    _writer: Any = field(default=None, init=False, repr=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.ds.fp16_enabled():
            return self.ds(*args, **kwargs)
        # DeepSpeed's fp16 section casts the module to half but leaves its inputs alone (a conv then
        # fails: "Input type (torch.cuda.FloatTensor) and weight type (torch.cuda.HalfTensor)"). Feed
        # it half, and hand back fp32 so that losses and their reductions are computed in fp32.
        out = self.ds(*_cast_floating(args, torch.half), **_cast_floating(kwargs, torch.half))
        return _cast_floating(out, torch.float32)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def compile(self, options: dict[str, Any]) -> None:
        """torch.compile the module in place (DeepSpeed's engine.compile -> nn.Module.compile): its
        parameter names, state_dict and checkpoints stay as they were, DeepSpeed's ZeRO hooks stay on
        the module. Nothing compiles here: the first forward and backward do (startup's compile_s)."""
        self.ds.compile(compile_kwargs=options)

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        if self._writer is not None:
            # The last save copies the weights and optimizer state this step changes in the
            # background (checkpoint/writer.py), overlapping this step's forward and backward.
            self._writer.wait_staged()
        if self.clip_grad_norm and self.ds.is_gradient_accumulation_boundary():
            # Where DeepSpeed would clip: after its all-reduce of the gradients, before the update.
            params = [p for g in self.ds.optimizer.param_groups for p in g["params"] if p.grad is not None]
            self._grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        # DeepSpeed only updates on the gradient-accumulation boundary; the LR schedule steps with it.
        self.ds.step()

    @property
    def can_discard_grads(self) -> bool:
        """Whether `discard_grads` can undo a backward: under ZeRO-0 the gradients are the parameters'
        `.grad` and nothing else (ZeRO-1/2/3 keep reduced partitions in DeepSpeed's private buffers);
        with accumulation a backward adds to gradients that must be kept."""
        return self.ds.zero_optimization_stage() == 0 and self.ds.gradient_accumulation_steps() == 1

    def discard_grads(self) -> None:
        """Throw away the last backward's gradients (a skipped step): the weights, optimizer state, LR
        schedule and DeepSpeed's step counters stay as they were."""
        self.ds.zero_grad()

    def abandon_accumulation(self) -> None:
        """Drop the gradients of this optimizer step's micro-batches so far (a step skipped after some
        of its micro-batches ran backward) and rewind DeepSpeed's micro-step counter to the step's
        start, so its next accumulation boundary is again the loop's step end. Without the rewind a
        skipped micro-batch (no `step()`) shifts every later update across two loop steps.

        DeepSpeed has no public call for this; it is what its own fp16-overflow path does to skip an
        update (stage_1_and_2 / stage3 `step` on overflow), without the loss-scale change."""
        done = self.ds.micro_steps % self.ds.gradient_accumulation_steps()
        if done == 0:
            return  # no backward of this step reached DeepSpeed: nothing to drop
        optimizer = self.ds.optimizer
        self.ds.zero_grad()  # the module's .grad (ZeRO-0/1 accumulate there until the boundary)
        if self.ds.zero_optimization_stage() == 0:
            optimizer.zero_grad(set_to_none=True)
        else:  # ZeRO-2/3 reduce every micro-step into partitions; ZeRO-1 keeps nothing else yet
            optimizer.zero_grad(set_to_none=True)  # ZeRO-3 also resets its micro_step_id here
            release = getattr(optimizer, "_release_preflattened_grad_buffers", None)
            if release is not None:
                release()
            if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False):
                optimizer.reset_cpu_buffers()
            elif isinstance(optimizer.averaged_gradients, dict) and self.ds.zero_optimization_stage() == 3:
                optimizer.averaged_gradients = {}
            else:
                for key in list(optimizer.averaged_gradients):
                    optimizer.averaged_gradients[key] = None
                    if hasattr(optimizer, "all_grad_tensors"):
                        optimizer.all_grad_tensors[key] = None
            if self.ds.zero_optimization_stage() in (1, 2):
                optimizer.micro_step_id = -1  # INITIAL_MICRO_STEP_ID: the next backward starts afresh
        self.ds.micro_steps -= done

    def measure_grad_norm(self, on: bool) -> None:
        """Compute the gradient norm in the coming steps (`grad_norm`), where it is optional (see
        `norm_on_demand`). DeepSpeed reads its optimizer's flag at every step; the config key of the
        same name only sets its initial value."""
        if self.ds.zero_optimization_stage() in (1, 2) and not self.ds.zero_compute_grad_norm():
            self.ds.optimizer.compute_grad_norm = on

    def lr(self) -> list[float]:
        return [group["lr"] for group in self.ds.optimizer.param_groups]

    def grad_norm(self) -> float | None:
        norm = self._grad_norm if self.clip_grad_norm else self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self) -> float | None:
        """The current dynamic loss scale under fp16 (None otherwise): a scale that keeps falling means
        gradients keep overflowing."""
        if not self.ds.fp16_enabled():
            return None
        # What DeepSpeed's own step report reads (its method is private): the scaler lives on the
        # optimizer, under a different attribute for the fp16 and the ZeRO optimizers.
        scaler = getattr(self.ds.optimizer, "loss_scale_config", None)
        scale = scaler.cur_scale if scaler is not None else getattr(self.ds.optimizer, "cur_scale", None)
        return None if scale is None else float(scale)

    def overflow_steps(self) -> int:
        """Optimizer steps DeepSpeed skipped for an fp16 gradient overflow (this segment's and, after
        a resume, the checkpoint's count)."""
        return int(self.ds.skipped_steps)

    def save(self, directory: Path, tag: str, writer: Any = None) -> None:
        """Collective: every rank writes its part (ZeRO partitions) under directory/tag. With a
        `writer` (checkpoint.writer.BackgroundWriter), DeepSpeed's tensor files go through it: staged
        in memory here, written in the background (small metadata files are still written here). The
        tensors only `step` changes are copied in the background until the next `step`."""
        if writer is None:
            self.ds.save_checkpoint(str(directory), tag=tag)
            return
        own = self.ds.checkpoint_engine
        self.ds.checkpoint_engine = _writer_checkpoint_engine(writer, self.step_owned_storages())
        self._writer = writer
        try:
            self.ds.save_checkpoint(str(directory), tag=tag)
        finally:
            self.ds.checkpoint_engine = own  # loads keep DeepSpeed's own reader

    def step_owned_storages(self) -> frozenset[int]:
        """The storages (data_ptr) of the tensors that only `step` writes: the trainable weights (under
        ZeRO-1/2 views of DeepSpeed's flat groups), the optimizer's state and its fp32 masters. Not the
        module's buffers (a forward updates BatchNorm statistics) nor frozen weights. A tensor missed
        here is merely staged before the save returns, so listing too few is slow, never wrong."""
        tensors = [p for p in self.ds.module.parameters() if p.requires_grad]
        optimizers = [self.ds.optimizer, getattr(self.ds.optimizer, "optimizer", None)]
        for opt in (o for o in optimizers if o is not None):
            tensors += [p for group in getattr(opt, "param_groups", ()) for p in group["params"]]
            for state in getattr(opt, "state", {}).values():
                tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
            # the fp32 masters of ZeRO-1/2, ZeRO-3 (outside param_groups between steps) and DeepSpeed's
            # fp16/bf16 optimizers without ZeRO
            for attr in (
                "single_partition_of_fp32_groups",
                "fp32_partitioned_groups_flat",
                "fp32_groups_flat",
            ):
                tensors += [t for t in getattr(opt, attr, None) or () if isinstance(t, torch.Tensor)]
        return frozenset(t.untyped_storage().data_ptr() for t in tensors if not t.is_cuda)

    def is_finite(self) -> bool:
        """Whether this rank's trainable weights are all finite (the fp32 masters under ZeRO: what the
        optimizer holds in its param groups). A local check; callers agree across ranks."""
        return all(bool(torch.isfinite(p).all()) for p in self._master_weights())

    def _master_weights(self) -> list[torch.Tensor]:
        """This rank's fp32 master weights (its partition under ZeRO). ZeRO-3 keeps them out of the
        optimizer's param groups between steps (it puts them in only inside its step and its state
        dict calls), so read its flat partitions there, less the alignment padding (left uninitialised
        by ZeRO-3's partitioning); ZeRO-0/1/2 hold them in the param groups (padding zeroed)."""
        optimizer = self.ds.optimizer
        flat = getattr(optimizer, "fp32_partitioned_groups_flat", None)
        if flat is not None:
            return [t for group in optimizer.get_groups_without_padding(flat) for t in group]
        return [p for group in optimizer.param_groups for p in group["params"]]

    def weights_checksum(self) -> tuple[float, float]:
        """(sum, sum of squares) of the fp32 master weights in float64, over all ranks. Collective.
        Independent of how ZeRO partitions them (up to float64 rounding), so it compares a run's
        weights across a save and a resume at another world size."""
        device = self.ds.device  # NCCL reduces GPU tensors only (offloaded masters live on the CPU)
        local = torch.zeros(2, dtype=torch.float64, device=device)
        for p in self._master_weights():
            flat = p.detach().double()
            local += torch.stack([flat.sum(), (flat * flat).sum()]).to(device)
        if self.ds.zero_optimization_stage() > 0 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(local)  # partitions: each rank holds a slice
        return float(local[0]), float(local[1])

    def load(self, directory: Path, tag: str) -> None:
        """Collective: restores module, optimizer, LR schedule (and ZeRO partitions) of this rank."""
        load_path, _ = self.ds.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        # DeepSpeed returns None instead of raising when it finds nothing: never start fresh silently.
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint '{tag}' under {directory}")


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """`value` with its floating-point tensors (also inside lists, tuples and dicts) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if type(value) in (list, tuple):
        return type(value)(_cast_floating(v, dtype) for v in value)
    if type(value) is dict:
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    return value


def _writer_checkpoint_engine(writer: Any, deferred: frozenset[int]) -> Any:
    """A DeepSpeed CheckpointEngine that hands each state dict to our background writer (the tensors
    in `deferred` storages staged in the background)."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class WriterCheckpointEngine(CheckpointEngine):
        def create(self, info: Any) -> None:
            pass

        def save(self, state_dict: Any, path: str) -> None:
            writer.submit(state_dict, path, deferred)

        def load(self, path: str, map_location: Any = None) -> Any:
            raise AssertionError("only used for saving")

        def commit(self, info: Any) -> bool:
            return True  # our commit is the MANIFEST + rename, after every rank's writes are done

        def preserves_storage_sharing(self) -> bool:
            return False  # the writer stages compact copies itself; DeepSpeed need not clone first

    return WriterCheckpointEngine()


CUDA_GRAPH_MODES = ("reduce-overhead",)


def compile_problem(options: dict[str, Any], *, use_gpu: bool) -> str | None:
    """Why `train.compile` with these options cannot work on this run's workers, or None. Asked by
    the plan (exit 2): in the workers the failure would come at the first step, after Ray, W&B and
    the run dir have started."""
    if options["mode"] in CUDA_GRAPH_MODES and not use_gpu:
        return (
            f"train.compile mode '{options['mode']}' is CUDA graphs, which need a GPU "
            "(cluster.use_gpu=true); on CPU use mode default or max-autotune-no-cudagraphs"
        )
    if use_gpu:
        return None  # inductor's GPU kernels are Triton, which comes with torch's CUDA build
    try:  # torch's own search for the C++ compiler its CPU kernels need (a private API: it may move)
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # whatever the search raises, the answer is "none found"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            "train.compile on CPU needs a C++ compiler for inductor's kernels and torch found none "
            f"({first}): install one (apt install g++, or set CXX) or set train.compile=false"
        )
    return None


def compile_seconds() -> float:
    """Seconds this process has spent in torch.compile so far (dynamo + inductor, forward and
    backward graphs), from torch's own timers: a private API, so 0.0 if it moves."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):
        return 0.0


def op_cache_dir() -> Path:
    """Where this Python environment's JIT-built DeepSpeed ops live: one directory per environment.
    torch's default (~/.cache/torch_extensions/py311_cpu/<op>) is shared by every venv of a user, and
    an op's build flags name the venv's include paths, so two checkouts on one machine rebuild
    deepspeed_shm_comm (60-160 s on 2 cores) each time the other one ran last."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    prefix = os.path.realpath(sys.prefix)
    return base / f"env-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}"


def use_environment_op_cache() -> None:
    """Point torch's extension builds at op_cache_dir(), unless the user set TORCH_EXTENSIONS_DIR."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(op_cache_dir()))


def build_engine(
    name: str,
    model: nn.Module,
    *,
    optim: OptimConfig,
    train: TrainConfig,
    precision: str,
    zero: ZeroConfig,
    raw: dict[str, Any],
    micro_batch_size: int,
    load_universal: bool = False,
    lr_mult: dict[str, float] | None = None,
    delayed: list[str] | None = None,
    start_step: int = 0,
    updates_per_step: int = 1,
) -> Engine:
    """Collective: every rank must call it in the same order (DeepSpeed broadcasts/partitions here).
    `load_universal`: the checkpoint to load next is a DeepSpeed universal checkpoint (world-size change)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_environment_op_cache()
    import deepspeed  # heavy: imported where it is used

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a torch API that torch deprecates; the warning is not actionable for users.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
        category=FutureWarning,
    )
    config = deepspeed_config(
        micro_batch_size=micro_batch_size, train=train, precision=precision, zero=zero, raw=raw
    )
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    groups = param_groups(model, optim.weight_decay, lr_mult, delayed, start_step)
    optimizer = make_optimizer(groups, optim)
    # One LR function per group: a pure function of the step, so a resumed run recreates it exactly.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [_group_schedule(optim, train.max_steps, g["start_step"], updates_per_step) for g in groups],
    )
    # DeepSpeed prints (not logs) its op builds and communication setup here; a quiet console keeps
    # them out unless `pipeline train --verbose`. Errors still raise (and go to stderr).
    quiet = contextlib.nullcontext() if verbose() else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        ds_engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=config
        )
    local_clip = train.clip_grad_norm if clips_locally(zero, precision, train) else 0.0
    return Engine(name=name, ds=ds_engine, clip_grad_norm=local_clip)
