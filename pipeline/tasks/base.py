"""The task protocol, public as `pipeline.Task`: how a batch becomes losses, updates and metrics.

A task is a `Task` subclass (pure torch: no DeepSpeed, no collectives of its own); name a built-in
one (`task.name: classify`) or yours (`task.name: mypkg.tasks:MyTask`, constructed with `task.args`
as keyword arguments). The loop owns everything distributed; the task says what to compute:

    ENGINES = ("model",)              engine names; each becomes one DeepSpeed engine (own optimizer,
                                      LR schedule, ZeRO state), all checkpointed and resumed together
    split(model)                      -> {engine name: nn.Module}: the parts of the built model
    train_step(step: Step)            -> {name: scalar tensor}, logged as train/<name> ("loss": main)
    EVAL_SUMS = n; eval_sums(models, x, y) -> 1-D tensor of n sums over one val batch (all-reduced
                                      over batches and ranks by the loop)
    eval_metrics(sums)                -> {"eval/...": float} from the summed vector
    best_metric, best_mode            the eval metric `checkpoint.keep_best` and `Result.best` rank by
    needs_labels, normalization(), num_outputs(), grid(), sample_images(), eval_dummy(): see below

Per micro-batch the loop calls `task.train_step(step)` with a `Step`: the batch (`step.x`, `step.y`),
the optimizer step number (`step.number`), the models by engine name (`step.models`: call one for its
forward, `.module` is the plain `nn.Module`) and one way to change weights, `step.update(name, loss)`
(an async checkpoint copies weights and optimizer state in the background until the next `update`:
change parameters in place only after it; buffers may change any time).
`update` is where every rank agrees (one tiny all-reduce) that the loss is finite everywhere before
anything changes: a rank that stepped alone would deadlock ZeRO's collectives. The models offer no
backward or step of their own, so a task cannot update without that agreement; when `update` returns
False the step is skipped on every rank and the task should return at once. Call `update` the same
number of times, for the same engines in the same order, on every rank (decide on agreed values
only: `step.skipped`, `update`'s result): the agreement checks this and stops the run with a clear
error otherwise, instead of hanging. A loss that reaches another engine's parameters (a GAN's
generator loss through the discriminator) goes through that engine's `.module` with its parameters'
`requires_grad` off, so only the updated engine computes gradients (see tasks/gan.py).
Randomness (noise, mixup, masks) drawn from torch's global RNG is restored exactly on resume.

A task that learns by acting (reinforcement learning, tasks/ppo.py) sets `source = "environment"`:
its batches come from environments instead of shards. The loop then gives each `train_step` the
worker's environments as `step.envs` (an `Environments`: `env.num_envs` copies of Gymnasium
`env.id`, whose states the checkpoints hold) and empty `x`/`y`; the task collects its own rollout
and may call `update` several times per step, declaring how many in `updates_per_step` (the LR
schedule counts loop steps). It defines `act(models, obs, action_space=..., deterministic=...)`,
which evaluation uses: `env.eval_episodes` episodes of the deterministic policy, summed into the
vector EPISODE_SUMS names, which `eval_metrics` turns into eval/ metrics (the base class's default:
eval/return, eval/return_std, eval/length). Environment tasks train under ZeRO 0-2: the ranks'
evaluation episodes end at different times, and ZeRO-3 would need every forward on every rank.

A task that reads text (tasks/language.py) sets `token_inputs = True`: its batches are (N, T + 1)
int64 token windows of `pipeline data prepare text:` shards (other tasks refuse those shards, it
refuses others). Its `text_samples(models, vocab=..., rng=..., device=...)` returns (prompt,
continuation) pairs, which rank 0 writes at every eval to samples/step_X.txt and a W&B table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn


class Agree(Protocol):
    """The loop's per-update collective: every rank calls it once per `Step.update`."""

    def start(self, loss: torch.Tensor, *, update: int = 0, engine: int = -1) -> Callable[[], bool]:
        """Start the agreement on `loss` (an all-reduce in the background); call the result for the
        answer: True when the loss is finite on every rank (and no injected fault says otherwise).
        `update` (1, 2 ... within the micro-batch) and `engine` (its index in ENGINES) must be the
        same on every rank; the answer raises if they are not."""
        ...


class Updatable(Protocol):
    """What `Step.update` needs of an engine (pipeline.engine.Engine)."""

    module: nn.Module
    can_discard_grads: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def discard_grads(self) -> None: ...


class Environments(Protocol):
    """What `Step.envs` offers an environment task (pipeline.envs.VectorEnvs)."""

    action_space: dict[str, Any]  # {"type": "discrete", "n": N} | {"type": "box", "shape", "low", "high"}
    observations: Any  # np.ndarray (num_envs, *observation shape), float32: the current observations

    @property
    def num_envs(self) -> int: ...

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[int, Any]]:
        """(observations, rewards, terminated, truncated, {env index: final observation}) as numpy
        arrays; copies whose episode ended are reset at once (their final observation in the dict)."""
        ...


class Model:
    """A forward-only view of an engine for task code: call it, or read `.module`."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return getattr(self._engine, "module", self._engine)


def forward_only(engines: Mapping[str, Any]) -> dict[str, Model]:
    return {name: Model(engine) for name, engine in engines.items()}


class Step:
    """One micro-batch as a task's `train_step` sees it (see the module docstring)."""

    def __init__(
        self,
        *,
        x: torch.Tensor,
        y: torch.Tensor,
        number: int,
        engines: Mapping[str, Updatable],
        agree: Agree,
        skipped: bool = False,
        envs: Environments | None = None,
    ) -> None:
        self.x, self.y, self.number = x, y, number
        self.envs = envs  # an environment task's environments (None for a task that reads shards)
        self.models = forward_only(engines)
        self._engines = engines
        self._agree = agree
        # True once the ranks agreed to skip this step (a non-finite loss); given True for the later
        # micro-batches of a skipped step, whose updates then agree but change nothing
        self.skipped = skipped
        self.updates = 0  # how many agreements this micro-batch reached (the loop checks >= 1)

    def update(self, engine: str, loss: torch.Tensor) -> bool:
        """Backward + step of `engine` if every rank's loss is finite; False (and `skipped`) if not.

        Where the engine can throw a backward's gradients away (`can_discard_grads`: ZeRO-0 without
        accumulation) the agreement's all-reduce runs during backward and a skip discards the
        gradients: a blocking all-reduce before backward would be a second lock-step point per step,
        and waiting there cost 2-3.6 ms of a 50-60 ms CNN step on 2 cores. Elsewhere (ZeRO-1/2/3 keep
        reduced gradient partitions inside DeepSpeed; with accumulation the other micro-batches'
        gradients are kept) it is agreed before backward."""
        if engine not in self._engines:
            raise KeyError(
                f"step.update: no engine {engine!r}; the task's engines: {', '.join(self._engines)}"
            )
        target = self._engines[engine]
        self.updates += 1
        tag = {"update": self.updates, "engine": list(self._engines).index(engine)}
        if self.skipped:  # an earlier update of this step was skipped: agree again, change nothing
            self._agree.start(loss, **tag)()
            return False
        if target.can_discard_grads:
            agreed = self._agree.start(loss, **tag)
            target.backward(loss)  # every rank runs it (a non-finite loss too): collectives stay matched
            if not agreed():
                target.discard_grads()
                self.skipped = True
                return False
        else:
            if not self._agree.start(loss, **tag)():
                self.skipped = True
                return False
            target.backward(loss)
        target.step()  # DeepSpeed updates on the gradient-accumulation boundary only
        return True


class Task:
    """The base of every task: defaults for a single-engine task named "model" (see the module doc).
    Subclasses define `train_step`, `eval_sums` (and `EVAL_SUMS`) and `eval_metrics`."""

    EVAL_SUMS = 0  # length of the eval_sums vector
    ENGINES: tuple[str, ...] = ("model",)
    best_metric = "eval/accuracy"
    best_mode = "max"
    needs_labels = True
    source = "shards"  # or "environment": batches come from env.id (see the module docstring)
    # True: batches are (N, T + 1) int64 token windows of text shards (`pipeline data prepare text:`),
    # and only such a task trains on them (tasks/language.py)
    token_inputs = False
    # an environment task's eval vector: what evaluation sums over its episodes
    EPISODE_SUMS = ("episodes", "return", "return_squared", "length")

    @property
    def updates_per_step(self) -> int:
        """`Step.update` calls per engine per loop step (an environment task's epochs x minibatches):
        the LR schedule advances once per loop step, whatever this is."""
        return 1

    def act(
        self,
        models: Mapping[str, Model],
        obs: torch.Tensor,
        *,
        action_space: dict[str, Any],
        deterministic: bool,
    ) -> torch.Tensor:
        """An environment task's actions for a batch of observations (the mode of its policy when
        `deterministic`: evaluation and exported policies)."""
        raise NotImplementedError

    def episode_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """eval/ metrics of an environment task from the EPISODE_SUMS vector summed over episodes."""
        episodes, total, squared, length = (float(v) for v in sums)
        mean = total / max(episodes, 1.0)
        variance = max(squared / max(episodes, 1.0) - mean * mean, 0.0)
        return {
            "eval/return": mean,
            "eval/return_std": variance**0.5,
            "eval/length": length / max(episodes, 1.0),
            "eval/episodes": episodes,
        }

    def normalization(self, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
        """The per-channel (mean, std) inputs are normalised with: the data's by default."""
        return mean, std

    def num_outputs(self, num_classes: int) -> int:
        """The `num_classes` the model is built with: the data's classes for a task that uses labels,
        else 0 (for a sequence model: predict the input's own features)."""
        return num_classes if self.needs_labels else 0

    def split(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"model": model}

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_sums(self, models: Mapping[str, Model], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval_dummy(self, models: Mapping[str, Model], x: torch.Tensor) -> None:
        """A forward that every engine's parameters take part in (a rank without val data runs it so
        ZeRO-3's parameter all-gathers stay matched across ranks)."""
        with torch.no_grad():
            for model in models.values():
                model(x)

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def grid(self, models: Mapping[str, Model], fixed_x: torch.Tensor) -> torch.Tensor | None:
        return None

    def text_samples(
        self, models: Mapping[str, Model], *, vocab: Any, rng: torch.Generator, device: str
    ) -> list[tuple[str, str]] | None:
        """(prompt, generated continuation) pairs a token task shows at each eval (samples/step_X.txt
        and a W&B table), drawing randomness from `rng` only; `vocab` (pipeline.vocab.Vocab) encodes
        and decodes text. None: it generates nothing."""
        return None

    def sample_images(
        self, models: Mapping[str, Model], count: int, rng: torch.Generator
    ) -> torch.Tensor | None:
        """`count` generated images in the data's normalised space (for scores of generative models
        such as `task.score_classifier`'s), drawing noise from `rng` only; None: not a generator."""
        return None
