"""The language-model recipe's parts: token LSTM/GRU (embedding, tied weights, state carried on),
the next-token loss and its metrics, seeded generation, and the preflight that refuses what cannot
train (exit 2 naming the key)."""

import math

import pytest
import torch
from torch.nn import functional

from pipeline import config, models
from pipeline.config import ConfigError
from pipeline.launch.plan import make_plan
from pipeline.tasks.base import Step
from pipeline.tasks.language import LanguageModelTask, generate
from pipeline.vocab import Vocab

VOCAB = Vocab.of_text("abcdefgh ")


def _lm(cell="lstm", **args):
    torch.manual_seed(0)
    return models.build(cell, {"embedding_dim": 16, "hidden_size": 16, "output": "sequence", **args}, [9], 9)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_token_model_gives_next_token_logits_and_carries_its_state(cell):
    model = _lm(cell).eval()
    tokens = torch.randint(0, 9, (3, 12))
    logits = model(tokens)
    assert logits.shape == (3, 12, 9)
    # reading 12 tokens at once == reading 7, then 5 more from the state it left
    first, state = model(tokens[:, :7], return_state=True)
    rest, _ = model(tokens[:, 7:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), logits, rtol=1e-5, atol=1e-6)


def test_tied_weights_share_one_matrix_and_need_matching_sizes():
    tied = _lm(tie_weights=True)
    assert tied.head[1].weight is tied.embedding.weight
    untied = _lm()
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in untied.parameters()) - 9 * 16
    with pytest.raises(
        ConfigError, match="embedding_dim \\(16\\) must equal hidden_size x directions \\(32\\)"
    ):
        models.build("lstm", {"embedding_dim": 16, "hidden_size": 32, "tie_weights": True}, [9], 9)


def test_the_loss_is_next_token_cross_entropy_and_bpc_is_it_in_bits():
    task = LanguageModelTask()
    model = _lm().eval()  # no dropout: the two forwards compare
    tokens = torch.randint(0, 9, (4, 11))
    logits = model(tokens[:, :-1])
    expected = functional.cross_entropy(logits.reshape(-1, 9), tokens[:, 1:].reshape(-1))

    class Agree:
        def start(self, loss, **_):
            return lambda: True

    class Engine:  # records what Step.update hands the engine
        module, can_discard_grads = model, False

        def __call__(self, x):
            return model(x)

        def backward(self, loss):
            self.loss = loss

        def step(self):
            pass

    engine = Engine()
    losses = task.train_step(
        Step(x=tokens, y=torch.zeros(4), number=1, engines={"model": engine}, agree=Agree())
    )
    torch.testing.assert_close(losses["loss"], expected.detach())
    torch.testing.assert_close(engine.loss, expected)
    sums = task.eval_sums({"model": model}, tokens, torch.zeros(4))
    metrics = task.eval_metrics(sums)
    assert sums[1] == 40 and sums[3] == 4  # every position of every window counts
    assert metrics["eval/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["eval/bpc"] == pytest.approx(expected.item() / math.log(2), rel=1e-5)
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)


def test_generation_is_seeded_and_the_same_with_or_without_the_carried_state():
    model = _lm().eval()

    class Stateless(torch.nn.Module):  # a user's model: re-reads the whole context per token
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    def run(m, seed, **kw):
        args = {"tokens": 30, "temperature": 1.0, "top_k": 0} | kw
        return generate(m, VOCAB, "abc", rng=torch.Generator().manual_seed(seed), **args)

    first = run(model, 1)
    assert len(first) == 30 and set(first) <= set(VOCAB.symbols)
    assert run(model, 1) == first and run(model, 2) != first
    assert run(Stateless(), 1) == first  # the state carried on computes what re-reading computes
    greedy = run(model, 1, temperature=0.0)
    assert run(model, 7, top_k=1) == greedy  # top-1 sampling is the argmax whatever the seed


def _text_cfg(text_dir, tmp_path, *overrides):
    return config.load(
        "configs/lstm-lm-text.yaml",
        [f"data.train={text_dir}", f"run_dir={tmp_path / 'run'}", "optim.warmup_steps=1", *overrides],
    )


def test_the_recipe_plans_on_token_shards(text_dir, tmp_path):
    plan = make_plan(_text_cfg(text_dir, tmp_path))
    assert plan.spec.kind == "tokens" and plan.spec.num_classes == len(plan.spec.classes)
    assert "token windows of 32 (+1 target), char vocabulary of" in plan.describe()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.name=classify", "task.args={}"], r"'task.name'.*token windows.*language_model"),
        (["model.args={hidden_size: 16, output: sequence}"], r"'model.name'.*model.args.embedding_dim"),
        (["model.args.output=last"], r"returns \(N, T, \d+\) logits .* it returned \(2, \d+\)"),
        (["model.args.bidirectional=true"], r"sees the tokens it should predict .*bidirectional=false"),
        (["task.args.prompts=['Zürich ¶ ']"], r"'task.args.prompts'.*not in the vocabulary"),
        (["task.args.temperature=-1"], r"'task.args'.*temperature must be >= 0"),
    ],
)
def test_what_cannot_train_on_tokens_is_refused_naming_the_key(text_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_plan(_text_cfg(text_dir, tmp_path, *overrides))
    assert not (tmp_path / "run").exists()


def test_the_language_model_task_refuses_image_shards(digits_dir, tmp_path):
    cfg = config.load(
        "configs/smoke.yaml",
        [f"data.train={digits_dir}", f"run_dir={tmp_path}/r", "task.name=language_model"],
    )
    with pytest.raises(ConfigError, match=r"'data.train': task 'language_model' trains on token windows"):
        make_plan(cfg)
