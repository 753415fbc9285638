"""Control over the data of ``torchdora train``: --val-size/--test-size, --eval-data/--test-data, mixtures of
several --data with --data-weights (each source's val_loss), their one-line errors, and the test split scored with
best-adapter/ after early stopping. Through the CLI, on the tiny model and data of test_train."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from test_train import make_tiny_model, one_thread, read_metrics, tiny_config, write_tiny_data  # noqa: F401
from torchdora.app import cli
from torchdora.app.data import load_dataset
from torchdora.app.data.mixture import load_training_data, mix
from torchdora.app.data.schema import Example
from torchdora.app.data.splits import split


def rows(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"Review: good {tag} {i}\nIs this review positive or negative? Answer:",
             "completion": " positive" if i % 2 else " negative", "options": [" positive", " negative"]}
            for i in range(n)]


def write(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data-options")
    return make_tiny_model(root / "model"), write_tiny_data(root / "data", n=40)


def train(tiny, out: Path, *args: str) -> int:
    model, data = tiny
    common = ["--model", str(model), "--output-dir", str(out), "--batch-size", "4", "--rank", "4", "--lr", "1e-2",
              "--warmup-steps", "0", "--max-eval", "16", "--targets", "q_proj,v_proj", "--sample-prompts", "0"]
    if "--data" not in args:
        common += ["--data", str(data)]
    return cli.main(["train", *common, *args])


# ---- splits -----------------------------------------------------------------------------------------------------
def test_default_sizes_split_as_before_80_10_10():
    examples = [Example(f"p{i}", " a") for i in range(50)]
    train, validation, test = split(examples, 0, "x")
    assert (len(train), len(validation), len(test)) == (40, 5, 5)
    assert split(examples, 0, "x", 0.1, 0.1) == (train, validation, test)


@pytest.mark.parametrize("val, test, expected", [(0.2, 0.1, (35, 10, 5)), (7, 3, (40, 7, 3)), (0, 0.1, (45, 0, 5)),
                                                 (0, 0, (50, 0, 0)), (5, 0, (45, 5, 0))])
def test_sizes_are_fractions_counts_or_zero(val, test, expected):
    examples = [Example(f"p{i}", " a") for i in range(50)]
    parts = split(examples, 3, "x", val, test)
    assert tuple(map(len, parts)) == expected
    assert sorted(e.prompt for part in parts for e in part) == sorted(e.prompt for e in examples)  # all kept


def test_zero_sizes_train_on_everything_and_the_fingerprint_differs(tmp_path, tiny):
    everything = load_dataset(tiny[1], val_size=0, test_size=0)
    assert len(everything.train) == 40 and not everything.validation and not everything.test
    from torchdora.app.train.preflight import data_fingerprint

    assert data_fingerprint(everything.items()) != data_fingerprint(load_dataset(tiny[1]).items())


def test_a_folder_with_datasets_split_names(tmp_path):
    write(tmp_path / "training.jsonl", rows(20, "t"))
    write(tmp_path / "valid.jsonl", rows(4, "v"))
    write(tmp_path / "eval.jsonl", rows(3, "e"))  # `eval` names a test split in datasets, and here
    splits = load_dataset(tmp_path)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (20, 4, 3)
    (tmp_path / "eval.jsonl").unlink()
    assert len(load_dataset(tmp_path, test_size=0).test) == 0 and len(load_dataset(tmp_path).train) == 18


# ---- mixtures -----------------------------------------------------------------------------------------------------
def test_weights_are_shares_of_the_mixture_deterministic_in_the_seed():
    a = [Example(f"a{i}", " x") for i in range(30)]
    b = [Example(f"b{i}", " x") for i in range(10)]
    mixed = mix([a, b], [0.25, 0.75], seed=1)
    counts = Counter(e.prompt[0] for e in mixed)
    assert counts == {"a": 10, "b": 30}  # 40 examples: a down-sampled to 10, b repeated three times
    assert Counter(e.prompt for e in mixed if e.prompt[0] == "b") == {e.prompt: 3 for e in b}
    assert len({e.prompt for e in mixed if e.prompt[0] == "a"}) == 10  # drawn without replacement
    assert mix([a, b], [0.25, 0.75], seed=1) == mixed and mix([a, b], [0.25, 0.75], seed=2) != mixed
    assert Counter(mix([a, b], None, seed=0)) == Counter(a + b)  # no weights: every example once


def test_each_source_is_split_on_its_own(tmp_path):
    first, second = write(tmp_path / "first.jsonl", rows(30, "f")), write(tmp_path / "second.jsonl", rows(20, "s"))
    data = load_training_data([str(first), str(second)], seed=0)
    assert set(data.validation_by_source) == {"first", "second"}
    assert [len(v) for v in data.validation_by_source.values()] == [3, 2]
    assert data.splits.validation == data.validation_by_source["first"] + data.validation_by_source["second"]
    assert len(data.splits.train) == 24 + 16 and len(data.splits.test) == 5
    held_out = {e.prompt for e in data.splits.validation + data.splits.test}
    assert not held_out & {e.prompt for e in data.splits.train}


def test_mixture_run_reports_each_sources_val_loss(tiny, tmp_path, capsys):
    first, second = write(tmp_path / "first.jsonl", rows(30, "f")), write(tmp_path / "second.jsonl", rows(20, "s"))
    code = train(tiny, tmp_path / "run", "--data", str(first), "--data", str(second), "--data-weights", "0.7", "0.3",
                 "--steps", "2", "--eval-every", "2")
    assert code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == [str(first), str(second)] and config["data_weights"] == [0.7, 0.3]
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "datasets:\n- first.jsonl\n- second.jsonl\n" in card
    record = next(r for r in read_metrics(tmp_path / "run") if r.get("split") == "validation")
    assert set(record) >= {"val_loss", "val_loss/first", "val_loss/second"}
    # the overall loss pools the tokens of both: it lies between the two
    low, high = sorted((record["val_loss/first"], record["val_loss/second"]))
    assert low <= record["val_loss"] <= high
    # torchdora eval on the run's adapter takes the run's data: the mixture's test split (3 + 2 rows)
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    out = capsys.readouterr()
    assert "split=test examples=5 " in out.out, out


def test_a_yaml_list_of_path_and_weight(tiny, tmp_path):
    from torchdora.app.train.options import config_from_args

    first, second = write(tmp_path / "a.jsonl", rows(10, "a")), write(tmp_path / "b.jsonl", rows(10, "b"))
    (tmp_path / "mix.yaml").write_text(f"data:\n  - {{path: {first}, weight: 2}}\n  - {{path: {second}, weight: 1}}\n")
    config = config_from_args(["--config", str(tmp_path / "mix.yaml")])
    assert config.data == [str(first), str(second)] and config.data_weights == [2.0, 1.0]
    from torchdora.app.train.options import config_to_yaml

    (tmp_path / "printed.yaml").write_text(config_to_yaml(config))  # --print-config reads back as the same config
    assert config_from_args(["--config", str(tmp_path / "printed.yaml")]) == config


# ---- separate files, train on everything ------------------------------------------------------------------------
def test_eval_and_test_files_replace_the_cut_splits(tiny, tmp_path):
    evaluation, test = write(tmp_path / "dev.jsonl", rows(6, "d")), write(tmp_path / "held.jsonl", rows(5, "h"))
    code = train(tiny, tmp_path / "run", "--eval-data", str(evaluation), "--test-data", str(test), "--steps", "2",
                 "--eval-every", "2")
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_examples"] == 5 and summary["test_scored_with"] == "best-adapter"
    data = load_training_data(str(tiny[1]), eval_data=str(evaluation), test_data=str(test))
    assert len(data.splits.train) == 40 and [e.prompt for e in data.splits.validation] == [
        r["prompt"] for r in rows(6, "d")]


def test_val_and_test_size_zero_trains_on_everything(tiny, tmp_path, capsys):
    assert train(tiny, tmp_path / "run", "--val-size", "0", "--test-size", "0", "--steps", "2") == 0
    out = capsys.readouterr().out
    assert "data: 40 train / 0 validation / 0 test examples" in out and "no test split" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_scored_with"] is None and summary["test_examples"] == 0
    assert not [r for r in read_metrics(tmp_path / "run") if r.get("split") in ("validation", "test")]


def test_changed_sizes_count_as_changed_data_for_resume(tiny, tmp_path, capsys):
    assert train(tiny, tmp_path / "run", "--steps", "2", "--checkpoint-every", "2", "--eval-every", "0") == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--val-size", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "changed since its checkpoint" in err and "validation" in err and "Traceback" not in err


# ---- the best adapter scores the test split -----------------------------------------------------------------------
def test_after_early_stopping_the_test_split_is_scored_with_best_adapter(tiny, tmp_path, capsys):
    import torchdora
    from torchdora.app.evaluate import evaluate_examples
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchdora.app.train import train as train_api
    from torchdora.app.train.run import compute_loss

    def ascent(model, batch):  # gradient ascent: the validation loss rises after the first evaluation
        loss, count = compute_loss(model, batch)
        return -loss, count

    train_api(tiny_config(tiny[0], tiny[1], tmp_path / "run", steps=8, eval_every=2, early_stopping_patience=2,
                          sample_prompts=0, warmup_steps=0), loss=ascent)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_scored_with"] == "best-adapter" and summary["test_scored_step"] == summary["best_step"]
    assert summary["early_stopped_at"] == summary["steps"] > summary["best_step"]  # the last adapter is not the best
    assert f"scored after    with best-adapter/ (step {summary['best_step']};" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny[0])
    torchdora.load_adapter(model, tmp_path / "run" / "best-adapter")
    test = load_dataset(tiny[1], max_eval=16).test
    expected = evaluate_examples(model, tokenizer, test, 96, 16)
    assert summary["perplexity_after"] == pytest.approx(expected.perplexity, rel=1e-5)
    last = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    torchdora.load_adapter(last, tmp_path / "run" / "adapter")  # the last step's weights score differently
    assert evaluate_examples(last, tokenizer, test, 96, 16).perplexity != pytest.approx(expected.perplexity, rel=1e-3)
    record = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "test"][-1]
    assert record["adapter"] == "best" and record["adapter_step"] == summary["best_step"]


# ---- one-line errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--val-size", "-1"], "val_size must be >= 0"),
    (["--test-size", "1.5"], "a fraction must be below 1"),
    (["--val-size", "abc"], "val_size must be a fraction in (0, 1) or a whole number"),
    (["--val-size", "30", "--test-size", "10"], "which leaves no training rows"),
    (["--data-weights", "0.5"], "--data-weights gives 1 weight(s) for 2 --data source(s)"),
    (["--data-weights", "1", "0"], "--data-weights must be positive numbers"),
    (["--data-weights", "1", "-2"], "--data-weights must be positive numbers"),
    (["--eval-data", "missing.jsonl"], "--eval-data missing.jsonl does not exist"),
    (["--test-data", "."], "is not a regular file (a folder)"),
    (["--val-size", "0", "--metric-for-best", "val_loss"], "--metric-for-best val_loss needs validation examples"),
    (["--val-size", "0", "--early-stopping-patience", "2"], "--early-stopping-patience needs validation examples"),
])
def test_bad_data_options_are_one_line_errors(tiny, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    data = ["--data", str(tiny[1])] + (["--data", str(tiny[1])] if args[0] == "--data-weights" else [])
    assert train(tiny, tmp_path / "out", *data, "--steps", "2", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_an_empty_eval_file_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert train(tiny, tmp_path / "out", "--eval-data", str(tmp_path / "empty.jsonl"), "--steps", "2") == 2
    err = capsys.readouterr().err
    assert f"--eval-data {tmp_path / 'empty.jsonl'} has no rows" in err and "Traceback" not in err


# ---- files read through datasets' builders ----------------------------------------------------------------------
def _hf_cache_files() -> set[Path]:
    import datasets

    root = Path(datasets.config.HF_DATASETS_CACHE)
    return set(root.rglob("*")) if root.exists() else set()


def test_csv_and_parquet_go_through_the_builders_offline_and_leave_no_cache(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from torchdora.app.data.builders import builder_rows
    from torchdora.app.data.readers import read_rows

    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion,options\nQ 01,"a, b",\nQ 2,  02,"[""  02"", ""x""]"\n')
    before = _hf_cache_files()
    built = builder_rows(path)
    # every cell as written: no 01 -> 1, no empty cell -> NaN, the quoted comma kept
    assert built == [{"prompt": "Q 01", "completion": "a, b", "options": ""},
                     {"prompt": "Q 2", "completion": "  02", "options": '["  02", "x"]'}]
    assert read_rows(path) == [Example("Q 01", "a, b"), Example("Q 2", "  02", ("  02", "x"))]
    pq.write_table(pa.table({"text": ["good", "bad"], "label": [1, 0]}), tmp_path / "rows.parquet")
    assert builder_rows(tmp_path / "rows.parquet") == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    assert _hf_cache_files() == before


def test_when_the_builder_fails_the_error_names_the_line(tmp_path):
    from torchdora.app.data.builders import builder_rows
    from torchdora.app.data.readers import read_rows

    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\nq1,a1\nq2,a2,extra\n")
    assert builder_rows(path) is None
    with pytest.raises(ValueError, match=r"bad.csv:3: row has more cells than the header"):
        read_rows(path)
    path.write_text("prompt,completion\nq1,a1\nq2,\n")  # the builder reads it; the schema refuses row 2 (line 3)
    with pytest.raises(ValueError, match=r"bad.csv:3: field 'completion' is empty"):
        read_rows(path)
    path.write_text("prompt,prompt\nq1,a1\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: the header names column 'prompt' twice"):
        read_rows(path)
