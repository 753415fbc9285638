"""Multiple-choice scoring, accuracy, perplexity and the training loss against plain float64 recomputations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from test_train import make_tiny_model, one_thread, write_tiny_data  # noqa: F401 (one_thread: autouse fixture)
from torchdora.app.data import Collator, Example, tokenize_example, tokenize_examples
from torchdora.app.evaluate import EvalConfig, evaluate_examples, score_options, selected_logits, tokenized_requests
from torchdora.app.train import compute_loss


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-eval") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


EXAMPLES = [
    Example("Review: good fun film\nIs this review positive or negative? Answer:", " positive", (" positive", " negative")),
    Example("Review: dull boring plot\nIs this review positive or negative? Answer:", " negative", (" positive", " negative")),
    # options of different token counts: scored one sequence per option
    Example("Review: a very good movie", " very good", (" very good", " bad", " quite awful story")),
    Example("Review: the acting", " was weak", ()),  # free-form: perplexity only
]


def reference_scores(model: nn.Module, tokenizer, examples, max_length: int = 64) -> list[list[float]]:
    """Each option alone, full logits, float64 log-softmax, summed over the option's tokens."""
    model64 = type(model)(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    scores = []
    for example in examples:
        row = []
        for option in example.options or (example.completion,):
            item = tokenize_example(tokenizer, Example(example.prompt, option), max_length, add_eos=False)
            ids = torch.tensor([item["input_ids"]])
            with torch.no_grad():
                log_probs = torch.log_softmax(model64(ids).logits[0], dim=-1)
            row.append(sum(float(log_probs[p - 1, t]) for p, t in enumerate(item["labels"]) if t != -100))
        scores.append(row)
    return scores


def test_score_options_matches_float64_reference(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    got = score_options(model, tokenizer, EXAMPLES, max_length=64, batch_size=3)
    expected = reference_scores(model, tokenizer, EXAMPLES)
    assert [len(r) for r in got] == [2, 2, 3, 1]
    # float32 model vs float64 reference, log-probs of order -5 summed over <= 3 tokens
    torch.testing.assert_close(torch.tensor(sum(got, []), dtype=torch.float64), torch.tensor(sum(expected, []), dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)


def test_single_token_options_share_one_sequence(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    requests = tokenized_requests(tokenizer, EXAMPLES, max_length=64)
    per_example = [sum(r.example == i for r in requests) for i in range(len(EXAMPLES))]
    assert per_example == [1, 1, 3, 1]


def test_accuracy_and_perplexity_follow_the_scores(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = reference_scores(model, tokenizer, EXAMPLES)
    result = evaluate_examples(model, tokenizer, EXAMPLES, max_length=64, batch_size=2)
    gold = [0, 1, 0, 0]
    correct = sum(max(range(len(s)), key=s.__getitem__) == g for s, g, e in zip(expected, gold, EXAMPLES) if e.options)
    tokens = sum(sum(t != -100 for t in tokenize_example(tokenizer, e, 64, add_eos=False)["labels"]) for e in EXAMPLES)
    nll = -sum(s[g] for s, g in zip(expected, gold))
    assert (result.n_scored, result.n_correct, result.n_tokens) == (3, correct, tokens)
    assert result.accuracy == pytest.approx(correct / 3)
    assert result.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-4)  # float32 vs float64 scores


def test_scores_change_when_the_model_changes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    before = score_options(model, tokenizer, EXAMPLES[:2], max_length=64)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
        try:
            after = score_options(model, tokenizer, EXAMPLES[:2], max_length=64)
        finally:
            model.lm_head.weight.sub_(0.5)
    assert before != after


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose forward does not know ``logits_to_keep`` (older or custom models)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_selected_logits_equal_masked_full_logits(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = Collator(tokenizer.pad_token_id)(tokenize_examples(tokenizer, EXAMPLES, 64))
    keep = batch["labels"] != -100
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]
        fast = selected_logits(model, batch["input_ids"], batch["attention_mask"], keep)
        fallback = selected_logits(_NoLogitsToKeep(model), batch["input_ids"], batch["attention_mask"], keep)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)  # same math, lm_head on fewer rows
    torch.testing.assert_close(fallback, full, rtol=0, atol=0)


def test_training_loss_equals_transformers_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = Collator(tokenizer.pad_token_id)(tokenize_examples(tokenizer, EXAMPLES, 64))
    with torch.no_grad():
        ours, n_tokens = compute_loss(model, batch)
        theirs = model(**batch).loss  # transformers' shifted cross-entropy over labels != -100
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert n_tokens == int((batch["labels"][:, 1:] != -100).sum())


def test_eval_config_errors():
    with pytest.raises(ValueError, match="split must be 'test' or 'validation', got split='train'"):
        EvalConfig(split="train")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        EvalConfig(batch_size=0)


def _plain_greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Reference: full forward pass per new token, argmax, no cache, no batching, no padding."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_exact_match_follows_a_plain_greedy_loop(model_and_tokenizer):
    from torchdora.app.evaluate import greedy_answers

    model, tokenizer = model_and_tokenizer
    prompts = ["Review: good fun", "Review: the plot was dull and very boring", "Is this"]
    gold = [" a b c", " d e", " f"]  # never what this model generates: budgets of 4, 3 and 2 new tokens
    examples = [Example(p, g) for p, g in zip(prompts, gold)]
    prompt_ids = [tokenize_example(tokenizer, e, 64, add_eos=False)["input_ids"][: -len(g.split())]
                  for e, g in zip(examples, gold)]
    eos = tokenizer.eos_token_id
    expected = [tokenizer.decode(_plain_greedy(model, ids, len(g.split()) + 1, eos), skip_special_tokens=True)
                for ids, g in zip(prompt_ids, gold)]
    # batched, left-padded generation reproduces the one-at-a-time loop for prompts of different lengths
    assert greedy_answers(model, tokenizer, examples, 64, batch_size=3) == expected
    result = evaluate_examples(model, tokenizer, examples, 64, batch_size=2)
    assert (result.n_generated, result.n_exact, result.n_scored) == (3, 0, 0)
    assert math.isnan(result.accuracy) and result.metrics()["exact_match"] == 0.0

    # a match needs the answer and then the end: make the 4th greedy token the eos, the first 3 the gold answer
    tokens = _plain_greedy(model, prompt_ids[0], 4, eos)
    assert len(set(tokens)) == 4, tokens  # the stop token must not occur earlier
    answer = tokenizer.decode(tokens[:3], skip_special_tokens=True)
    before = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(tokens[3])
    try:
        hit = [Example(prompts[0], " " + answer), Example(prompts[0], " " + answer + " good")]
        result = evaluate_examples(model, tokenizer, hit, 64)
    finally:
        tokenizer.eos_token = before
    assert (result.n_generated, result.n_exact, result.exact_match) == (2, 1, 0.5)


# ---- answer options that cannot measure accuracy -------------------------------------------------------------
def test_a_single_option_gives_no_accuracy_and_a_note(model_and_tokenizer):
    """One option always has the highest score: the old code counted it right (accuracy 1.0)."""
    model, tokenizer = model_and_tokenizer
    single = [Example(e.prompt, e.completion, (e.completion,)) for e in EXAMPLES[:2]]
    alone = evaluate_examples(model, tokenizer, single, 64)
    assert (alone.n_scored, alone.n_correct, alone.n_one_option, alone.n_examples) == (0, 0, 2, 2)
    assert math.isnan(alone.accuracy) and "2 of the 2 examples have a single option" in alone.accuracy_note
    assert alone.metrics()["accuracy_note"] == alone.accuracy_note  # in every metrics.jsonl record too
    mixed = evaluate_examples(model, tokenizer, EXAMPLES + single, 64)
    full = evaluate_examples(model, tokenizer, EXAMPLES, 64)
    # the two-or-more-option examples alone make the accuracy; every example still counts for perplexity
    assert (mixed.n_scored, mixed.n_correct, mixed.n_examples) == (full.n_scored, full.n_correct, 6)
    assert mixed.n_tokens > full.n_tokens and "the accuracy covers the 3 examples" in mixed.accuracy_note


@dataclass(frozen=True)
class OwnExample:
    """A caller's own example type (the fields :class:`Example` has, without its checks)."""

    prompt: str
    completion: str
    options: tuple[str, ...] = ()
    messages: tuple = ()


def test_an_answer_outside_its_options_is_an_error_naming_the_example(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = [*EXAMPLES[:2], OwnExample("Review: so so", " maybe", (" positive", " negative"))]
    with pytest.raises(ValueError, match=r"example 2 \(prompt 'Review: so so'\): its answer ' maybe' is not one of "
                                         r"its options \[' positive', ' negative'\]"):
        evaluate_examples(model, tokenizer, examples, 64)


def test_eval_cli_on_single_option_data_prints_a_note_not_an_accuracy(model_and_tokenizer, tmp_path, capsys):
    import json

    from torchdora.app import cli

    folder = make_tiny_model(tmp_path / "model")
    rows = [{"text": f"good fun film {i}", "label": "positive"} for i in range(30)]  # one label: one option
    data = tmp_path / "one_label.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["eval", "--model", str(folder), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "accuracy=- " in out and "accuracy=1" not in out and "examples=3 " in out
    assert "note: 3 of the 3 examples have a single option, which always scores as right: no accuracy" in out
