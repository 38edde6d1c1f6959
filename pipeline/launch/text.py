"""Preflight of token data (`pipeline data prepare text:` shards) and the task and model that train on
them, on the driver before any worker starts (ConfigError: exit 2 naming the key)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.shards import DataSpec
from pipeline.vocab import Vocab, VocabError

PREPARE = "`pipeline data prepare text:PATH --out DIR` (or text-stdlib)"


def check_token_task(cfg: Config, task: Any, spec: DataSpec) -> None:
    """Token windows go to a task that reads tokens, and such a task gets token windows."""
    reads_tokens = bool(getattr(task, "token_inputs", False))
    if reads_tokens and spec.kind != "tokens":
        raise ConfigError(
            f"config key 'data.train': task '{cfg.task.name}' trains on token windows of text, but "
            f"data.train holds {spec.kind} samples; prepare text with {PREPARE}"
        )
    if spec.kind == "tokens" and not reads_tokens:
        raise ConfigError(
            f"config key 'task.name': data.train holds token windows of text ({spec.vocab} vocabulary of "
            f"{spec.num_classes}); task '{cfg.task.name}' does not read tokens: use task.name=language_model"
        )


def check_language_model(cfg: Config, task: Any, model: nn.Module, spec: DataSpec) -> None:
    """The model maps (N, T) ids to (N, T, vocabulary) logits and never reads ahead (a change of the
    last token must leave the earlier positions' logits alone: a bidirectional model would learn to
    copy the target), and the prompts are text the vocabulary can encode."""
    seq_len, vocab_size = spec.sample_shape[0] - 1, spec.num_classes
    where = f"config key 'model.name': model '{cfg.model.name}' on token windows of {seq_len}"
    tokens = torch.randint(0, vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % vocab_size
    was_training = model.training
    model.eval()  # dropout off: both forwards must see the same network
    try:
        with torch.no_grad():
            logits, logits_changed = model(tokens), model(changed)
    except Exception as e:
        raise ConfigError(
            f"{where} cannot read token ids: {type(e).__name__}: {e}; for lstm/gru set "
            "model.args.embedding_dim (e.g. 64) and model.args.output=sequence"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, seq_len, vocab_size):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(
            f"{where}: a language model returns (N, T, {vocab_size}) logits for (N, T) ids, it returned "
            f"{got}; for lstm/gru set model.args.embedding_dim and model.args.output=sequence"
        )
    if seq_len > 1 and not torch.equal(logits[:, :-1], logits_changed[:, :-1]):
        raise ConfigError(
            f"{where}: its predictions for earlier positions change with a later token, so it sees the "
            "tokens it should predict (bidirectional?); set model.args.bidirectional=false"
        )
    vocab = Vocab.from_manifest(spec.vocab, spec.classes)
    for prompt in getattr(task, "prompts", []):
        try:
            vocab.encode(prompt)
        except VocabError as e:
            raise ConfigError(f"config key 'task.args.prompts': {prompt!r}: {e} of data.train") from None
