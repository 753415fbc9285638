"""The practitioner's loop through the CLI on the tiny chat model: messages data -> train with a validation split,
early stopping and samples -> generate from a prompt file, chat -> merge (model card) -> compare runs."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from test_train import FILLER, NEGATIVE, POSITIVE, make_tiny_model, one_thread, read_metrics  # noqa: F401
from torchdora.app import cli

SYSTEM = "Answer positive or negative"


def write_chat_data(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": f"Review : {' '.join(words)} {i}"},
                                  {"role": "assistant", "content": label}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-loop")
    model, data = make_tiny_model(root / "model", chat=True), write_chat_data(root / "chat.jsonl")
    common = ["--model", str(model), "--data", str(data), "--steps", "6", "--batch-size", "4", "--lr", "1e-2",
              "--rank", "4", "--warmup-steps", "1", "--eval-every", "2", "--targets", "q_proj,v_proj",
              "--sample-prompts", "2", "--sample-max-new-tokens", "4", "--max-length", "48"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", *common, "--output-dir", str(root / "dora"), "--early-stopping-patience", "2"]) == 0
        assert cli.main(["train", *common, "--output-dir", str(root / "lora"), "--method", "lora"]) == 0
    finally:
        torch.set_num_threads(before)
    return {"root": root, "model": model, "data": data, "run": root / "dora", "lora": root / "lora"}


def plain_chat_answer(model_dir: Path, adapter: Path, turns: list[dict], new: int) -> str:
    """Plain transformers: chat template, greedy generate, decode (the reference for generate and chat)."""
    import torchdora
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torchdora.load_adapter(model, adapter)
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    row = out[0, ids["input_ids"].shape[1]:].tolist()
    row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
    return tokenizer.decode(row, skip_special_tokens=True)


def test_the_run_evaluated_on_its_validation_split_with_samples(loop):
    records = read_metrics(loop["run"])
    validation = [r for r in records if r.get("split") == "validation"]
    assert validation and all(r["val_loss"] is not None and r["accuracy"] is None for r in validation)
    samples = [r for r in records if r.get("split") == "samples"]
    assert len(samples) == len(validation) and all(len(r["samples"]) == 2 for r in samples)
    summary = json.loads((loop["run"] / "summary.json").read_text())
    assert summary["metric_for_best"] == "val_loss" and summary["best_step"] in [r["step"] for r in validation]


def test_generate_answers_a_prompt_file_in_batches(loop, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    turns = [{"role": "user", "content": "Review : good fun film"}]
    prompts.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"prompt": "Review : awful dull"}) + "\n"
                       + json.dumps({"prompt": "Review : superb moving plot"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--adapter", str(loop["run"] / "adapter"), "--model", str(loop["model"]),
                     "--prompt-file", str(prompts), "--output", str(answers), "--system", SYSTEM,
                     "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r.get("prompt") for r in rows] == [None, "Review : awful dull", "Review : superb moving plot"]
    assert rows[0]["messages"] == turns
    system = [{"role": "system", "content": SYSTEM}]
    for row, user in zip(rows, [turns, [{"role": "user", "content": "Review : awful dull"}],
                                [{"role": "user", "content": "Review : superb moving plot"}]]):
        assert row["answer"] == plain_chat_answer(loop["model"], loop["run"] / "adapter", system + user, 4)
    # text lines: one prompt per line, continued as text
    lines = tmp_path / "prompts.txt"
    lines.write_text("Review : good\n\nReview : bad\n")
    assert cli.main(["generate", "--model", str(loop["model"]), "--prompt-file", str(lines), "--output",
                     str(tmp_path / "plain.jsonl"), "--max-new-tokens", "2"]) == 0
    assert len((tmp_path / "plain.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["--prompt-file", "missing.txt", "--output", "a.jsonl"], "missing.txt does not exist"),
    (["--prompt-file", "prompts.txt"], "needs --output answers.jsonl"),
    (["--prompt", "hi", "--output", "a.jsonl"], "--output writes the answers of a --prompt-file"),
    (["--prompt", "hi", "--prompt-file", "prompts.txt", "--output", "a.jsonl"], "not both"),
    (["--prompt-file", "bad.jsonl", "--output", "a.jsonl"], "bad.jsonl, line 2: not JSON"),
    (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_generate_option_errors_are_one_line(loop, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("hi\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    assert cli.main(["generate", "--model", str(loop["model"]), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_system_prompt_needs_a_chat_template(tmp_path, capsys):
    plain = make_tiny_model(tmp_path / "plain")  # no chat template
    assert cli.main(["generate", "--model", str(plain), "--prompt", "good", "--system", SYSTEM]) == 2
    assert "has no chat template" in capsys.readouterr().err
    assert cli.main(["chat", "--model", str(plain)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_chat_keeps_the_history_and_streams_the_answers(loop, monkeypatch, capsys):
    from torchdora.app.chat import ChatConfig, chat_session

    out = io.StringIO()
    writes: list[str] = []
    real_write = out.write
    out.write = lambda text: (writes.append(text), real_write(text))[1]  # type: ignore[method-assign]
    stdin = io.StringIO("Review : good fun\n/reset\nReview : bad\nReview : dull\n/exit\nnot read\n")
    history = chat_session(ChatConfig(adapter=str(loop["run"] / "adapter"), model=str(loop["model"]), system=SYSTEM,
                                      max_new_tokens=5), stdin=stdin, stdout=out)
    assert [t for r, t in history if r == "user"] == ["Review : bad", "Review : dull"]  # /reset forgot the first
    system = [{"role": "system", "content": SYSTEM}]
    first = plain_chat_answer(loop["model"], loop["run"] / "adapter",
                              system + [{"role": "user", "content": "Review : bad"}], 5)
    second = plain_chat_answer(loop["model"], loop["run"] / "adapter",
                               system + [{"role": "user", "content": "Review : bad"},
                                         {"role": "assistant", "content": first},
                                         {"role": "user", "content": "Review : dull"}], 5)
    assert [t for r, t in history if r == "assistant"] == [first, second]
    text = out.getvalue()
    assert "(conversation forgotten)" in text and first in text and second in text
    # streamed: the answers arrive in more pieces than one write per answer (and the banner, the notice)
    assert len(writes) > 2 * 2 + 2
    # the command itself, reading piped standard input
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert cli.main(["chat", "--adapter", str(loop["run"] / "adapter"), "--model", str(loop["model"]),
                     "--max-new-tokens", "2"]) == 0
    assert "chatting with" in capsys.readouterr().out
    assert cli.main(["chat", "--model", str(loop["model"]), "--temperature", "-1"]) == 2


def test_merged_folder_card_names_its_base_and_metrics(loop, tmp_path):
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(loop["run"] / "best-adapter"), "--output", str(merged)]) == 0
    text = (merged / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["base_model"] == str(loop["model"].resolve()) and header["library_name"] == "transformers"
    assert "dora" in header["tags"] and header["datasets"] == ["chat.jsonl"] and "loss" in header["metrics"]
    summary = json.loads((loop["run"] / "summary.json").read_text())
    assert f"| best_val_loss | {summary['best_val_loss']:.4f} |" in text and "best-adapter" in text
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged)  # the card does not get in the way of loading


def test_compare_prints_a_table_and_writes_one_figure(loop, tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    figure = tmp_path / "compare.png"
    assert cli.main(["compare", str(loop["run"]), str(loop["lora"]), str(tmp_path / "not-a-run"),
                     "--output", str(figure)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:4] == ["run", "method", "steps", "final_loss"]
    dora = json.loads((loop["run"] / "summary.json").read_text())
    assert lines[1].split()[:4] == ["dora", "dora", str(dora["steps"]), f"{dora['final_loss']:.4f}"]
    assert lines[2].split()[:2] == ["lora", "lora"]
    assert captured.err.strip() == f"torchdora compare: {tmp_path / 'not-a-run'} is not a run folder (no " \
                                   "metrics.jsonl or summary.json): skipped"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["compare", str(tmp_path / "not-a-run")]) == 2
    assert cli.main(["compare", str(loop["run"]), "--output", str(tmp_path / "x.txt")]) == 2


def test_merged_card_of_an_adapter_outside_a_run_folder(loop, tmp_path):
    import shutil

    adapter = tmp_path / "loose" / "adapter"
    shutil.copytree(loop["run"] / "adapter", adapter)
    assert cli.main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    text = (tmp_path / "merged" / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["base_model"] == str(loop["model"].resolve()) and header["library_name"] == "transformers"
    assert header["tags"][:2] == ["torchdora", "dora"] and "No results were recorded." in text
