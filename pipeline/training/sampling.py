"""`pipeline generate`: text from a language model's checkpoint, in one process without DeepSpeed.

The checkpoint alone is enough: its MANIFEST records the model, the task's sampling settings and the
vocabulary (the shards need not be there). Generation runs in fp32 on the CPU with its own seeded
generator, so a given checkpoint, prompt, settings and seed give the same text on any machine."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline import models, tasks
from pipeline.checkpoint import commit, export
from pipeline.config import ConfigError
from pipeline.tasks.base import forward_only
from pipeline.vocab import Vocab, VocabError


def generate_from_checkpoint(
    ckpt: Path,
    *,
    prompt: str,
    tokens: int,
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """{"checkpoint", "step", "prompt", "continuation", "tokens", "temperature", "top_k", "seed"};
    temperature and top_k default to the run's task.args."""
    manifest = commit.verify(ckpt)
    data, meta = manifest.get("data") or {}, manifest["model"]
    if not data.get("vocab"):
        raise ConfigError(
            f"{ckpt} holds no vocabulary: `pipeline generate` continues text with a checkpoint of "
            "task.name=language_model (trained on `pipeline data prepare text:` shards)"
        )
    try:
        vocab = Vocab.from_manifest(data["vocab"], data.get("classes") or [])
    except VocabError as e:
        raise ConfigError(f"{ckpt}: its MANIFEST's vocabulary: {e}") from None
    task_meta = manifest.get("task") or {}
    name, args = task_meta.get("name", "language_model"), task_meta.get("args") or {}
    temperature = args.get("temperature", 0.8) if temperature is None else temperature
    top_k = args.get("top_k", 0) if top_k is None else top_k
    if tokens < 1 or temperature < 0 or top_k < 0:
        raise ConfigError("--tokens must be >= 1, --temperature >= 0 and --top-k >= 0")
    if not prompt:
        raise ConfigError("--prompt must not be empty: the model continues it")
    try:
        vocab.encode(prompt)
    except VocabError as e:
        raise ConfigError(
            f"--prompt {prompt!r}: {e} of this model (it knows only its training text's)"
        ) from None
    model = models.build(meta["name"], meta["args"], meta["input_shape"], meta["num_classes"])
    # DeepSpeed's ZeRO reader prints its progress to stdout, which is the generated text's alone
    with contextlib.redirect_stdout(sys.stderr):
        state_dict = export.consolidated_state_dict(ckpt, "model")  # verified first
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    # the run's task generates, through the Task protocol (text_samples), this prompt with these settings
    settings = {"prompts": [prompt], "sample_tokens": tokens, "temperature": temperature, "top_k": top_k}
    task = tasks.build(name, {**args, **settings})
    rng = torch.Generator().manual_seed(seed)
    samples = task.text_samples(forward_only({"model": model}), vocab=vocab, rng=rng, device="cpu")
    if not samples:
        raise ConfigError(f"task '{name}' of {ckpt} generates no text (it defines no text_samples)")
    ((_, continuation),) = samples
    return {
        "checkpoint": str(ckpt),
        "step": manifest["step"],
        "prompt": prompt,
        "continuation": continuation,
        "tokens": tokens,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
    }
