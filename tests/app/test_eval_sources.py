"""``torchdora eval``: the adapter's own run data by default, and lm-evaluation-harness tasks from a local YAML."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from test_train import make_tiny_model, one_thread, write_tiny_data  # noqa: F401
from torchdora.app import cli


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory) -> dict[str, Path]:
    """A 2-step run with split seed 3 (not eval's old default 0)."""
    root = tmp_path_factory.mktemp("eval-sources")
    model, data = make_tiny_model(root / "model"), write_tiny_data(root / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(root / "run"),
                         "--steps", "2", "--batch-size", "4", "--rank", "4", "--eval-every", "0", "--seed", "3",
                         "--max-eval", "16", "--targets", "q_proj,v_proj"]) == 0
    finally:
        torch.set_num_threads(before)
    return {"model": model, "data": data, "run": root / "run"}


def eval_line(capsys, *args: str) -> tuple[str, str]:
    assert cli.main(["eval", *args]) == 0
    captured = capsys.readouterr()
    return captured.out.strip().splitlines()[0], captured.err


def test_eval_defaults_to_the_data_and_seed_the_adapter_was_trained_on(seeded_run, capsys):
    model, data, adapter = str(seeded_run["model"]), str(seeded_run["data"]), str(seeded_run["run"] / "adapter")
    default, note = eval_line(capsys, "--model", model, "--adapter", adapter, "--max-eval", "16")
    assert f"data: {data} (test split, seed 3)" in note and "config.json" in note
    explicit, _ = eval_line(capsys, "--model", model, "--adapter", adapter, "--data", data, "--seed", "3",
                            "--max-eval", "16")
    other_seed, _ = eval_line(capsys, "--model", model, "--adapter", adapter, "--data", data, "--seed", "0",
                              "--max-eval", "16")
    assert default == explicit and default != other_seed  # seed 0 holds out other examples
    reseeded, _ = eval_line(capsys, "--model", model, "--adapter", adapter, "--seed", "0", "--max-eval", "16")
    assert reseeded == other_seed  # --seed given: the run's data, that seed


LMEVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.mark.skipif(not LMEVAL, reason="needs the lmeval extra (lm-evaluation-harness)")
def test_eval_tasks_runs_a_local_harness_task_and_agrees_with_torchdora_scoring(seeded_run, tmp_path, capsys,
                                                                              monkeypatch):
    from torchdora.app.data import load_dataset
    from torchdora.app.evaluate import evaluate_examples
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torchdora

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    examples = load_dataset(str(seeded_run["data"]), seed=3, max_eval=8).test
    rows = tmp_path / "tiny_test.jsonl"
    rows.write_text("".join(json.dumps({"prompt": e.prompt, "choices": [o.strip() for o in e.options],
                                        "label": e.options.index(e.completion)}) + "\n" for e in examples))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_sentiment.yaml").write_text(
        "task: tiny_sentiment\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {rows}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{prompt}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    adapter = seeded_run["run"] / "adapter"
    assert cli.main(["eval", "--model", str(seeded_run["model"]), "--adapter", str(adapter), "--tasks",
                     "tiny_sentiment", "--include-path", str(tasks)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny_sentiment  acc "))
    acc = float(line.split()[2])
    # the harness scores " " + choice after the prompt: torchdora's own option scoring of the same examples
    model = AutoModelForCausalLM.from_pretrained(seeded_run["model"]).eval()
    torchdora.load_adapter(model, adapter)
    reference = evaluate_examples(model, AutoTokenizer.from_pretrained(seeded_run["model"]), examples)
    assert reference.n_scored == 8 and acc == pytest.approx(reference.accuracy)
    # a task name that does not exist: one line with the closest names, before the model loads
    assert cli.main(["eval", "--model", str(seeded_run["model"]), "--tasks", "tiny_sentimnt", "--include-path",
                     str(tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown lm-evaluation-harness task(s) ['tiny_sentimnt']" in err and len(err.splitlines()) == 1


def test_eval_tasks_without_the_extra_is_one_line(seeded_run, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    assert cli.main(["eval", "--model", str(seeded_run["model"]), "--tasks", "piqa"]) == 2
    assert "pip install 'torchdora[lmeval]'" in capsys.readouterr().err
