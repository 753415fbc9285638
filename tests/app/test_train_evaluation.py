"""Evaluation while training (val_loss, samples, custom metrics, trackers), the best adapter and early stopping,
and the run's model cards: through ``torchdora train`` on the tiny model and data of test_train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_train import make_tiny_model, one_thread, read_metrics, tiny_config, write_tiny_data  # noqa: F401
from torchdora.app import cli
from torchdora.app.train import train

SEEN: list[int] = []


def count_examples(model, tokenizer, examples) -> float:
    """A custom metric: the number of validation examples it was given (and a check that it gets the model)."""
    assert not model.training and hasattr(model, "generate")
    SEEN.append(len(examples))
    return float(len(examples))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One run evaluated every 2 steps with snapshots and a custom metric, and one that stops early."""
    root = tmp_path_factory.mktemp("train-eval")
    model, data = make_tiny_model(root / "model"), write_tiny_data(root / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(model, data, root / "run", steps=8, eval_every=2, save_every=2, sample_prompts=2,
                          sample_max_new_tokens=5), metrics={"n_examples": count_examples})
        # lr 1e-30 moves no weight by a rounding unit: every validation loss is the first one, so the second
        # evaluation is no improvement and patience 1 ends the run there, whatever the machine.
        code = cli.main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(root / "stopped"),
                         "--steps", "12", "--batch-size", "4", "--lr", "1e-30", "--rank", "4", "--max-eval", "8",
                         "--eval-every", "2", "--early-stopping-patience", "1", "--sample-prompts", "1",
                         "--sample-max-new-tokens", "3", "--report-to", "tensorboard", "--targets", "q_proj,v_proj"])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return {"model": model, "data": data, "run": root / "run", "stopped": root / "stopped"}


def reference_loss(model_dir: Path, adapter: Path, data: Path) -> float:
    """Mean cross-entropy over completion tokens (eos included) of the validation split, from full logits."""
    import torchdora
    from torchdora.app.data import load_dataset, tokenize_example
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torchdora.load_adapter(model, adapter)
    total, count = 0.0, 0
    for example in load_dataset(str(data), seed=0, max_eval=16).validation:
        item = tokenize_example(tokenizer, example, 96)
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor(item["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        keep = labels[1:] != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep].double(), labels[1:][keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def test_validation_loss_matches_a_plain_cross_entropy_of_the_snapshot(runs):
    records = [r for r in read_metrics(runs["run"]) if r.get("split") == "validation"]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    step4 = next(r for r in records if r["step"] == 4)
    reference = reference_loss(runs["model"], runs["run"] / "snapshots" / "step-000004", runs["data"])
    # batched and padded fp32 logits against one-sequence float64 cross-entropy: round-off only
    assert step4["val_loss"] == pytest.approx(reference, rel=1e-5)


def test_custom_metric_is_recorded_at_every_evaluation(runs):
    records = [r for r in read_metrics(runs["run"]) if r.get("split") == "validation"]
    assert [r["n_examples"] for r in records] == [12.0] * 4 and SEEN == [12] * 4


def test_sample_generations_are_logged_and_greedy(runs):
    from torchdora.app.data import load_dataset

    samples = [r for r in read_metrics(runs["run"]) if r.get("split") == "samples"]
    assert [r["step"] for r in samples] == [2, 4, 6, 8]
    validation = load_dataset(str(runs["data"]), seed=0, max_eval=16).validation
    for record in samples:
        assert [s["prompt"] for s in record["samples"]] == [e.prompt for e in validation[:2]]
        assert [s["reference"] for s in record["samples"]] == [e.completion for e in validation[:2]]
    # the step-8 sample again, from the final adapter with plain transformers greedy decoding, one prompt alone
    import torchdora
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(runs["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(runs["model"])
    torchdora.load_adapter(model, runs["run"] / "adapter")
    ids = tokenizer(validation[0].prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert samples[-1]["samples"][0]["generated"] == tokenizer.decode(new, skip_special_tokens=True)


def test_best_adapter_is_the_snapshot_of_the_lowest_validation_loss(runs):
    records = [r for r in read_metrics(runs["run"]) if r.get("split") == "validation"]
    best = min(records, key=lambda r: r["val_loss"])  # strictly lower wins: the first of equal values
    summary = json.loads((runs["run"] / "summary.json").read_text())
    assert summary["best_step"] == best["step"] and summary["best_val_loss"] == pytest.approx(best["val_loss"])
    assert summary["metric_for_best"] == "val_loss" and summary["early_stopped_at"] is None
    kept = load_file(runs["run"] / "best-adapter" / "torchdora_adapter.safetensors")
    snapshot = load_file(runs["run"] / "snapshots" / f"step-{best['step']:06d}" / "torchdora_adapter.safetensors")
    assert kept.keys() == snapshot.keys() and all(torch.equal(kept[k], snapshot[k]) for k in kept)


def test_early_stopping_ends_the_run_after_patience_evaluations(runs):
    stopped = runs["stopped"]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["early_stopped_at"] == 4 and summary["best_step"] == 2
    assert max(r["step"] for r in read_metrics(stopped) if "loss" in r) == 4
    assert (stopped / "best-adapter" / "README.md").is_file() and (stopped / "adapter").is_dir()


def test_samples_reach_the_tracker_as_a_table(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((runs["stopped"] / "trackers").rglob("events.out.tfevents.*"))
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags().get("tensors", []))
    assert any("validation_samples" in t for t in tags), tags


def test_model_cards_name_base_method_data_and_results(runs):
    summary = json.loads((runs["run"] / "summary.json").read_text())
    for folder, library in (("adapter", "peft"), ("adapter-peft", "peft"), ("best-adapter", "peft")):
        text = (runs["run"] / folder / "README.md").read_text()
        header = yaml.safe_load(text.split("---")[1])
        assert header["base_model"] == str(runs["model"].resolve()) and header["library_name"] == library
        assert "dora" in header["tags"] and header["datasets"] == ["tiny.jsonl"]
        assert "loss" in header["metrics"] and '"rank": 4' in text
    card = (runs["run"] / "adapter" / "README.md").read_text()
    assert f"| final_loss | {summary['final_loss']:.4f} |" in card
    assert "PeftModel.from_pretrained" in (runs["run"] / "adapter-peft" / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--metric-for-best", "val_accuracy"], "val_accuracy needs validation examples with two or more options"),
    (["--early-stopping-patience", "2", "--eval-every", "0"], "needs evaluations: set --eval-every"),
    (["--metric-for-best", "bleu"], "invalid choice: 'bleu'"),
    (["--sample-prompts", "-1"], "sample_prompts must be an integer >= 0"),
])
def test_bad_options_are_one_line_errors(runs, tmp_path, capsys, args, message):
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Review: good {i}", "completion": " fun"}) + "\n"
                            for i in range(20)))
    with pytest.raises(SystemExit) if "invalid choice" in message else _no_raise():
        code = cli.main(["train", "--model", str(runs["model"]), "--data", str(data), "--output-dir",
                         str(tmp_path / "out"), "--steps", "2", *args])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err


def _no_raise():
    import contextlib

    return contextlib.nullcontext()


def test_custom_metrics_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="custom metric name 'accuracy'"):
        train(tiny_config(tmp_path / "none", tmp_path / "none.jsonl", tmp_path / "out"), metrics={"accuracy": len})
    with pytest.raises(TypeError, match="must be a callable"):
        train(tiny_config(tmp_path / "none", tmp_path / "none.jsonl", tmp_path / "out"), metrics={"x": 1})
