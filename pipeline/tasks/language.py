"""Language modelling on token windows (`pipeline data prepare text:`): next-token cross-entropy at
every position, and generated text to look at.

A batch is (N, T + 1) token ids: the model reads the first T and predicts, at each position, the next
token (the last T). Eval reports the mean cross-entropy per token (eval/loss, nats), eval/perplexity
(exp of it), eval/bpc (bits per token: per character for a char vocabulary, per byte for a byte one)
and eval/accuracy (top-1 next token). At each eval the loop asks `text_samples` for a continuation of
every prompt in `task.args.prompts` (temperature, top_k, seeded by the run's seed: the same at every
eval, so steps compare) and writes them to samples/step_X.txt and W&B.

The model maps (N, T) ids to (N, T, vocabulary) logits. Generation carries its recurrent state when
its forward takes `state=` and `return_state=True` (models/rnn.py); otherwise it re-reads the whole
context for every new token.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional

from pipeline.tasks.base import Model, Step, Task
from pipeline.vocab import Vocab

DEFAULT_PROMPTS = ("The ", "If the ", "This method ")


class LanguageModelTask(Task):
    EVAL_SUMS = 4  # nats summed over tokens, tokens, correct next tokens, windows
    best_metric = "eval/bpc"
    best_mode = "min"
    needs_labels = False
    token_inputs = True

    def __init__(
        self,
        prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
        sample_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int = 0,
    ) -> None:
        if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError("task.args.prompts must be a list of non-empty strings")
        if sample_tokens < 0:
            raise ValueError(f"task.args.sample_tokens must be >= 0 (0: no samples), got {sample_tokens}")
        if temperature < 0:
            raise ValueError(
                f"task.args.temperature must be >= 0 (0: always the likeliest), got {temperature}"
            )
        if top_k < 0:
            raise ValueError(f"task.args.top_k must be >= 0 (0: the whole vocabulary), got {top_k}")
        self.prompts = list(prompts)
        self.sample_tokens, self.temperature, self.top_k = sample_tokens, temperature, top_k

    def num_outputs(self, num_classes: int) -> int:
        return num_classes  # the vocabulary size: one logit per token

    @staticmethod
    def logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, V) float logits of the next token at each of the first T positions."""
        inputs = tokens[:, :-1]
        logits = model(inputs).float()
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(inputs.shape):
            raise ValueError(
                f"language_model needs (N, T, vocabulary) logits for (N, T) token ids {tuple(inputs.shape)}, "
                f"got {tuple(logits.shape)}; set model.args.output=sequence and model.args.embedding_dim"
            )
        return logits

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        logits = self.logits(step.models["model"], step.x)
        loss = functional.cross_entropy(logits.flatten(0, 1), step.x[:, 1:].flatten())
        step.update("model", loss)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def eval_sums(self, models: Mapping[str, Model], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.logits(models["model"], x)
        targets = x[:, 1:]
        nats = functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
        return torch.stack(
            [
                nats,
                torch.tensor(float(targets.numel()), device=x.device),
                correct.float(),
                torch.tensor(float(len(x)), device=x.device),
            ]
        )

    def eval_dummy(self, models: Mapping[str, Model], x: torch.Tensor) -> None:
        with torch.no_grad():
            models["model"](x.long()[:, :-1])

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        nats, tokens, correct, windows = sums.tolist()
        loss = nats / max(tokens, 1.0)
        return {
            "eval/loss": loss,
            "eval/perplexity": math.exp(min(loss, 80.0)),
            "eval/bpc": loss / math.log(2.0),
            "eval/accuracy": correct / max(tokens, 1.0),
            "eval/samples": int(windows),
        }

    def text_samples(
        self, models: Mapping[str, Model], *, vocab: Vocab, rng: torch.Generator, device: str
    ) -> list[tuple[str, str]]:
        """(prompt, continuation) for each of `task.args.prompts`, drawing only from `rng`."""
        return (
            [
                (
                    prompt,
                    generate(
                        models["model"],
                        vocab,
                        prompt,
                        tokens=self.sample_tokens,
                        temperature=self.temperature,
                        top_k=self.top_k,
                        rng=rng,
                        device=device,
                    ),
                )
                for prompt in self.prompts
            ]
            if self.sample_tokens
            else []
        )


def takes_state(model: Any) -> bool:
    """Whether the model's forward carries a recurrent state (`state=`, `return_state=`)."""
    module = getattr(model, "module", model)
    try:
        names = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "state" in names and "return_state" in names


def next_token(logits: torch.Tensor, *, temperature: float, top_k: int, rng: torch.Generator) -> int:
    """One token from (V,) logits: the likeliest at temperature 0, else sampled from the softmax of
    logits / temperature over the top_k likeliest (all when 0)."""
    logits = logits.float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        cutoff = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=rng))


@torch.no_grad()
def generate(
    model: Any,
    vocab: Vocab,
    prompt: str,
    *,
    tokens: int,
    temperature: float,
    top_k: int,
    rng: torch.Generator,
    device: str = "cpu",
) -> str:
    """The continuation of `prompt` (`tokens` tokens), as text."""
    context = torch.as_tensor(vocab.encode(prompt).astype("int64"), device=device).view(1, -1)
    out: list[int] = []
    if takes_state(model):
        logits, state = model(context, return_state=True)
        for i in range(tokens):
            out.append(next_token(logits[0, -1], temperature=temperature, top_k=top_k, rng=rng))
            if i + 1 < tokens:
                step = torch.tensor([[out[-1]]], device=device)
                logits, state = model(step, state=state, return_state=True)
        return vocab.decode(out)
    for _ in range(tokens):
        logits = model(context)
        out.append(next_token(logits[0, -1], temperature=temperature, top_k=top_k, rng=rng))
        context = torch.cat([context, torch.tensor([[out[-1]]], device=device)], dim=1)
    return vocab.decode(out)
