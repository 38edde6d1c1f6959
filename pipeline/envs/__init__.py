"""Environments for tasks that learn by acting (reinforcement learning): the only gymnasium import.

`VectorEnvs` is one training worker's `env.num_envs` copies of a Gymnasium environment, stepped in
turn with same-step autoreset (an episode that ends is reset inside the same `step`, its last
observation handed back apart). Gymnasium's SyncVectorEnv steps copies in turn too; we keep our own
list because exact resume needs every copy's complete state (physics, time limit, RNG) as plain data,
which no Gymnasium vector env exposes, and because Gymnasium 1.x's default autoreset would spend one
step per episode on a reset whose action is ignored.

Everything here is plain numpy and Python: the checkpoint holds an environment's state as JSON
(trainer_state.json), never as a pickle, since a checkpoint is read with tensors only (trust.py).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.config import ConfigError, EnvConfig

HOW_TO_INSTALL = "install the RL extra: pip install 'pipeline[rl]' (or pip install gymnasium)"
EVAL_STREAM = 1_000_003  # seeds of evaluation episodes: a stream apart from every training env's
STATE_FORMAT = "pipeline-envs/1"
# Attributes of an environment (and of its wrappers) that are configuration, not state.
_NOT_STATE = {"spec", "_cached_spec", "_saved_kwargs", "metadata", "render_mode", "_np_random"}
# The bit generators an environment's RNG state may name (numpy's own; Gymnasium seeds PCG64).
_BIT_GENERATORS = {"PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"}


def _gym() -> Any:
    try:
        import gymnasium
    except ImportError:
        raise ConfigError(f"config key 'env.id': environments need gymnasium; {HOW_TO_INSTALL}") from None
    return gymnasium


def registered_ids() -> list[str]:
    return sorted(_gym().registry)


def make(env: EnvConfig) -> Any:
    """One copy of `env.id` (no rendering, no Gymnasium env checker: we check the spaces ourselves)."""
    gym = _gym()
    if env.id is None:
        raise ConfigError("config key 'env.id': an environment task needs env.id, e.g. env.id=CartPole-v1")
    if env.id not in gym.registry:
        close = difflib.get_close_matches(env.id, registered_ids(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"config key 'env.id': no Gymnasium environment '{env.id}' is registered{hint} "
            f"({len(gym.registry)} are, e.g. CartPole-v1, Acrobot-v1, MountainCar-v0, Pendulum-v1)"
        )
    kwargs = {"max_episode_steps": env.max_episode_steps} if env.max_episode_steps else {}
    try:
        return gym.make(env.id, disable_env_checker=True, **kwargs, **env.args)
    except Exception as e:  # a missing dependency (Box2D, MuJoCo), a wrong keyword in env.args
        raise ConfigError(
            f"config key 'env.args': gymnasium.make('{env.id}', **{env.args}) failed: {e}"
        ) from e


def spaces(env: EnvConfig) -> dict[str, Any]:
    """What a model is built for: {"observation_shape": [...], "action_space": {...}}, where the action
    space is {"type": "discrete", "n": N} or {"type": "box", "shape": [D], "low": [...], "high": [...]}.
    Other spaces are refused here, naming the key: before any worker starts."""
    gym = _gym()
    one = make(env)
    try:
        obs, act = one.observation_space, one.action_space
    finally:
        one.close()
    if not isinstance(obs, gym.spaces.Box) or not np.issubdtype(obs.dtype, np.floating):
        raise ConfigError(
            f"config key 'env.id': {env.id} observes {obs}; the pipeline's environment tasks take "
            "real-valued (Box) observations: pick another environment or wrap this one in your own "
            "registered Gymnasium id that flattens its observations to a float Box"
        )
    if isinstance(act, gym.spaces.Discrete):
        if int(act.start) != 0:
            raise ConfigError(
                f"config key 'env.id': {env.id} acts in {act}; discrete actions must start at 0"
            )
        action = {"type": "discrete", "n": int(act.n)}
    elif isinstance(act, gym.spaces.Box) and len(act.shape) == 1 and np.all(np.isfinite(act.low)):
        action = {"type": "box", "shape": list(act.shape), "low": act.low.tolist(), "high": act.high.tolist()}
    else:
        raise ConfigError(
            f"config key 'env.id': {env.id} acts in {act}; the pipeline's environment tasks handle "
            "Discrete(n) and bounded 1-D Box actions (categorical and Gaussian policies)"
        )
    return {"observation_shape": list(obs.shape), "action_space": action}


def env_seed(*parts: int) -> int:
    """A 32-bit seed of independent parts (seed, rank, env index ...), as numpy mixes them."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def to_env_action(action: np.ndarray, space: dict[str, Any]) -> Any:
    """A policy's action as the environment takes it: an int, or a Gaussian sample clipped to the box."""
    if space["type"] == "discrete":
        return int(action)
    # float32 as the Box is (clipping to the bounds' Python floats alone would hand it float64)
    return np.clip(np.asarray(action, dtype=np.float32), space["low"], space["high"]).astype(np.float32)


class VectorEnvs:
    """One worker's copies of an environment (see the module docstring). `observations` is the current
    (num_envs, *obs) float32 array; `step(actions)` advances every copy once."""

    def __init__(self, env: EnvConfig, *, seed: int, rank: int, stream: int = 0) -> None:
        """Copy i is reset once with seed env_seed(seed, rank, i[, stream]) and continues its own RNG
        from there (a resume restores it); `stream` (the resume step after a world-size change) starts
        new episodes rather than replaying the first ones."""
        self.config = env
        self.action_space = spaces(env)["action_space"]
        self.envs = [make(env) for _ in range(env.num_envs)]
        extra = [stream] if stream else []
        self.observations = np.stack(
            [e.reset(seed=env_seed(seed, rank, i, *extra))[0] for i, e in enumerate(self.envs)]
        ).astype(np.float32)
        self.returns = np.zeros(env.num_envs, dtype=np.float64)  # of the episodes in progress
        self.lengths = np.zeros(env.num_envs, dtype=np.int64)
        self.window = [0, 0.0, 0]  # episodes finished since the last log: count, return sum, length sum
        self.steps = 0  # environment steps taken by this worker (all copies)

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """(observations, rewards, terminated, truncated, {env index: final observation}) after one
        action per copy; a copy whose episode ended is reset at once, and `observations` holds its
        new episode's first observation (the final one is in the dict, for bootstrapping)."""
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float32)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        final: dict[int, np.ndarray] = {}
        for i, env in enumerate(self.envs):
            obs, reward, terminated[i], truncated[i], _ = env.step(
                to_env_action(actions[i], self.action_space)
            )
            rewards[i] = reward
            self.returns[i] += float(reward)
            self.lengths[i] += 1
            if terminated[i] or truncated[i]:
                self.window = [
                    self.window[0] + 1,
                    self.window[1] + float(self.returns[i]),
                    self.window[2] + int(self.lengths[i]),
                ]
                self.returns[i], self.lengths[i] = 0.0, 0
                final[i] = np.asarray(obs, dtype=np.float32)
                obs, _ = env.reset()
            self.observations[i] = obs
        self.steps += n
        return self.observations.copy(), rewards, terminated, truncated, final

    def take_window(self) -> list[float]:
        """[episodes, return sum, length sum] finished since the last call; a new window starts."""
        window, self.window = self.window, [0, 0.0, 0]
        return [float(v) for v in window]

    def local_state(self) -> dict[str, Any]:
        """Everything a resume needs, as JSON-able data: every copy's state, observations, episodes in
        progress, the window and the step count."""
        return {
            "format": STATE_FORMAT,
            "env_id": self.config.id,
            "envs": [_capture_env(e) for e in self.envs],
            "observations": _capture(self.observations),
            "returns": self.returns.tolist(),
            "lengths": self.lengths.tolist(),
            "window": list(self.window),
            "steps": self.steps,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """The state `local_state` returned (same env id and num_envs: checked)."""
        if state.get("format") != STATE_FORMAT or state.get("env_id") != self.config.id:
            raise ValueError(
                f"environment state of {state.get('env_id')!r} ({state.get('format')}) cannot restore "
                f"{self.config.id!r} ({STATE_FORMAT})"
            )
        if len(state["envs"]) != self.num_envs:
            raise ValueError(f"environment state holds {len(state['envs'])} copies, not {self.num_envs}")
        for env, saved in zip(self.envs, state["envs"], strict=True):
            _restore_env(env, saved)
        self.observations = _restored(state["observations"])
        self.returns = np.asarray(state["returns"], dtype=np.float64)
        self.lengths = np.asarray(state["lengths"], dtype=np.int64)
        self.window = list(state["window"])
        self.steps = int(state["steps"])

    def close(self) -> None:
        for env in self.envs:
            env.close()


def run_episodes(
    env: EnvConfig,
    *,
    seed: int,
    episodes: list[int],
    act: Callable[[np.ndarray], np.ndarray],
    batch: int,
) -> list[tuple[float, int]]:
    """(return, length) of each episode index in `episodes`, `batch` of them at a time, acting with
    `act` (observations -> actions). Episode e starts from seed env_seed(seed, EVAL_STREAM, e), so its
    result depends on the policy alone: not on the world size or on which rank runs it."""
    space = spaces(env)["action_space"]
    results: list[tuple[float, int]] = []
    for chunk in _chunks(episodes, max(1, batch)):
        copies = [make(env) for _ in chunk]
        obs = np.stack(
            [c.reset(seed=env_seed(seed, EVAL_STREAM, e))[0] for c, e in zip(copies, chunk, strict=True)]
        )
        obs = obs.astype(np.float32)
        returns, lengths = [0.0] * len(chunk), [0] * len(chunk)
        live = list(range(len(chunk)))
        while live:
            actions = act(obs[live])
            still = []
            for j, i in enumerate(live):
                o, reward, terminated, truncated, _ = copies[i].step(to_env_action(actions[j], space))
                returns[i] += float(reward)
                lengths[i] += 1
                obs[i] = o
                if not (terminated or truncated):
                    still.append(i)
            live = still
        for c in copies:
            c.close()
        results += list(zip(returns, lengths, strict=True))
    return results


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- an environment's state as plain data ------------------------------------------------------------


def _layers(env: Any) -> list[Any]:
    """The wrappers from the outside in, then the environment itself."""
    layers = [env]
    while hasattr(layers[-1], "env"):
        layers.append(layers[-1].env)
    return layers


def _capture(value: Any) -> Any:
    """A JSON-able form of a state value, or None where the value is not state (a space, a screen)."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {"ndarray": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return {"scalar": value.item(), "dtype": str(value.dtype)}
    if value is None or isinstance(value, bool | int | float | str):
        return {"plain": value}
    if isinstance(value, tuple | list) and all(isinstance(v, bool | int | float) for v in value):
        return {"sequence": list(value), "tuple": isinstance(value, tuple)}
    return None


def _restored(saved: dict[str, Any]) -> Any:
    if "ndarray" in saved:
        return np.asarray(saved["ndarray"], dtype=saved["dtype"]).reshape(saved["shape"])
    if "scalar" in saved:
        return np.dtype(saved["dtype"]).type(saved["scalar"])
    if "sequence" in saved:
        return tuple(saved["sequence"]) if saved["tuple"] else list(saved["sequence"])
    return saved["plain"]


def _capture_env(env: Any) -> dict[str, Any]:
    layers = []
    for layer in _layers(env):
        attrs = {}
        for name, value in vars(layer).items():
            if name in _NOT_STATE or name == "env":
                continue
            captured = _capture(value)
            if captured is not None:
                attrs[name] = captured
        layers.append({"class": type(layer).__name__, "attrs": attrs})
    rng = env.unwrapped._np_random
    return {"layers": layers, "rng": None if rng is None else rng.bit_generator.state}


def _restore_env(env: Any, saved: dict[str, Any]) -> None:
    layers = _layers(env)
    classes = [type(layer).__name__ for layer in layers]
    if classes != [layer["class"] for layer in saved["layers"]]:
        raise ValueError(
            f"environment state of wrappers {[s['class'] for s in saved['layers']]}, not {classes}"
        )
    for layer, state in zip(layers, saved["layers"], strict=True):
        for name, value in state["attrs"].items():
            # only state the fresh copy has too: a checkpoint's names never add or shadow attributes
            if name in _NOT_STATE or name not in vars(layer) or _capture(vars(layer)[name]) is None:
                raise ValueError(f"environment state names {type(layer).__name__}.{name}, which is not state")
            setattr(layer, name, _restored(value))
    if saved["rng"] is not None:
        kind = saved["rng"].get("bit_generator")
        if kind not in _BIT_GENERATORS:
            raise ValueError(
                f"environment state names the RNG {kind!r}, not one of {sorted(_BIT_GENERATORS)}"
            )
        bit_generator = getattr(np.random, kind)()
        bit_generator.state = saved["rng"]
        env.unwrapped._np_random = np.random.Generator(bit_generator)
