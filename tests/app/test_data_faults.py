"""Data defects of issue 25 (items 6, 11, 13, 14, 15), each reproduced through ``torchdora train`` / ``generate``
or the data API, on the tiny word-level model of ``test_train`` and the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from test_train import (  # noqa: F401 (one_thread: a fixture)
    FILLER,
    NEGATIVE,
    POSITIVE,
    make_tiny_model,
    make_tiny_tokenizer,
    one_thread,
    write_tiny_data,
)

from torchdora.app import cli
from torchdora.app.data import IGNORE_INDEX, Example, load_dataset, load_file, render_chat, tokenize_example
from torchdora.app.data.chat import tokenize_chat
from torchdora.app.train import main as train_main
from torchdora.app.train.options import load_config_file

SHORT_RUN = ["--steps", "1", "--batch-size", "4", "--rank", "4", "--eval-every", "0", "--checkpoint-every", "0",
             "--max-eval", "6", "--targets", "q_proj,v_proj"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("chat") / "model", chat=True)


def chat_rows() -> list[dict]:
    """60 rows, 20 distinct user turns with three answers each; every fifth user turn is 80 words long."""
    rows = []
    for i in range(60):
        prompt, answer = i % 20, POSITIVE[i % 8] if i % 2 else NEGATIVE[i % 8]
        words = (FILLER * 7)[:80] if prompt % 5 == 0 else FILLER[prompt % 5: prompt % 5 + 3]
        rows.append({"messages": [{"role": "user", "content": f"Review {' '.join(words)} {prompt}"},
                                  {"role": "assistant", "content": answer}]})
    return rows


# ---- item 6: rows that share a prompt are all kept, each prompt in one split ---------------------------------
def test_rows_sharing_a_prompt_are_kept_in_one_split(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    splits = load_dataset(data)
    assert [len(part) for _, part in splits.items()] == [48, 6, 6]  # all 60 rows (the old code kept 16 + 2 + 2)
    owner: dict[str, str] = {}
    for name, part in splits.items():
        for example in part:
            assert owner.setdefault(example.prompt, name) == name, example.prompt  # one split per prompt
    assert len(owner) == 20
    assert sorted(e.messages for _, part in splits.items() for e in part) == sorted(
        e.messages for e in load_file(data))  # every row, once


def test_group_split_equals_the_plain_split_when_prompts_are_distinct(tmp_path):
    """Distinct prompts: the same splits as before the change (experiments keep their test sets)."""
    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}"} for i in range(50)]
    splits = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), seed=4)
    ordered = [Example(r["prompt"], r["completion"]) for r in rows]
    random.Random(4).shuffle(ordered)  # the old split: shuffle, then test, validation, train slices of 5, 5, 40
    assert (splits.test, splits.validation, splits.train) == (ordered[:5], ordered[5:10], ordered[10:])


# ---- items 6 and 11: the counts printed by torchdora train, prompts cut from the left counted ---------------------
def test_train_prints_the_split_counts_and_the_number_of_cut_conversations(tmp_path, chat_model, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    max_length = 24
    assert train_main(["--model", str(chat_model), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                       "--max-length", str(max_length), *SHORT_RUN]) == 0
    out = capsys.readouterr().out
    assert "data: 48 train / 6 validation / 6 test examples; 60 rows with 20 distinct prompts" in out, out
    tokenizer, _ = make_tiny_tokenizer(chat=True)
    train_rows = load_dataset(data).train
    longer = sum(len(tokenizer(render_chat(tokenizer, e.messages), add_special_tokens=False)["input_ids"])
                 > max_length for e in train_rows)
    assert 0 < longer < len(train_rows)
    assert (f"data: {longer} of 48 training examples are longer than --max-length {max_length} and were cut"
            in out), out


# ---- item 11: repeated keys refused, naming the key ----------------------------------------------------------------
def test_repeated_keys_in_json_rows_are_refused_naming_key_and_line(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": " d", "prompt": "e"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: key 'prompt' appears twice"):
        load_file(jsonl)
    array = tmp_path / "d.json"
    array.write_text('[\n{"prompt": "a", "completion": " b"},\n{"messages": [{"role": "user", "content": "x",\n'
                     '"role": "assistant"}], "completion": " d"}\n]')
    with pytest.raises(ValueError, match=r"d\.json:3: key 'role' appears twice"):
        load_file(array)
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,completion,prompt\na, b,c\n")
    with pytest.raises(ValueError, match=r"d\.csv:1: the header names column 'prompt' twice"):
        load_file(csv)


def test_repeated_keys_in_config_files_are_refused_through_the_cli(tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("rank: 4\nlr: 1.0e-3\nrank: 99999\n")
    with pytest.raises(ValueError, match=r"option 'rank' is given twice; keep one"):
        load_config_file(yaml_file)
    assert train_main(["--config", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert "option 'rank' is given twice" in err and "line 3" in err and len(err.strip().splitlines()) == 1, err
    json_file = tmp_path / "run.json"
    json_file.write_text('{"rank": 4, "rank": 99999}')
    with pytest.raises(ValueError, match=r"run\.json could not be parsed: key 'rank' appears twice"):
        load_config_file(json_file)
    nested = tmp_path / "nested.yaml"  # the same key in two different mappings is fine
    nested.write_text("rank: 4\nlr: 1.0e-3\n")
    assert load_config_file(nested) == {"rank": 4, "lr": 1.0e-3}


# ---- item 13: a chat template that the sandbox refuses or that fails: one line naming it -------------------------
HOSTILE_TEMPLATES = {
    "SecurityError": "{{ messages.__class__.__mro__ }}",
    "OverflowError": "{% for i in range(10 ** 12) %}x{% endfor %}",
    "TemplateError": "{{ raise_exception('no') }}",
}


def _with_template(model: Path, folder: Path, template: str) -> Path:
    import shutil

    shutil.copytree(model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize("error", sorted(HOSTILE_TEMPLATES))
def test_a_failing_chat_template_is_one_line_in_train_and_generate(tmp_path, chat_model, capsys, error):
    model = _with_template(chat_model, tmp_path / "model", HOSTILE_TEMPLATES[error])
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    code = train_main(["--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run"), *SHORT_RUN])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the chat template of {model} failed ({error}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert cli.main(["generate", "--model", str(model), "--prompt", "Review good", "--chat",
                     "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"the chat template of {model} failed ({error}" in err and len(err.strip().splitlines()) == 1, err


# ---- item 14: undecodable bytes and files that are not regular files ------------------------------------------------
def test_a_non_utf8_data_file_names_the_file_and_line(tmp_path, capsys):
    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}"} for i in range(10)]
    bad = tmp_path / "bad.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    bad.write_bytes(text.replace(b"Q3?", b"Q3\xff?"))
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: byte 0xff at column 15 is not UTF-8 text"):
        load_dataset(bad)
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"prompt,completion\na, b\nc\xe9, d\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: byte 0xe9 at column 2 is not UTF-8"):
        load_file(csv)
    assert train_main(["--data", str(bad), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: byte 0xff" in err and "Traceback" not in err, err


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
def test_a_fifo_or_device_is_not_a_regular_file_for_data_and_weights(tmp_path, capsys):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)  # opening it would block until a writer comes: the check must not open it
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")  # reading it would never end
    for path in (fifo, zero):
        with pytest.raises(ValueError, match="is not a regular file"):
            load_dataset(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"train\.jsonl is not a regular file \(a link to /dev/zero\)"):
        load_dataset(folder)
    weights = tmp_path / "weights.gguf"
    weights.symlink_to("/dev/zero")
    data = write_tiny_data(tmp_path / "data")
    assert train_main(["--model", str(weights), "--data", str(data), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "is not a regular file" in err and "does not exist" not in err and "Traceback" not in err, err
    assert train_main(["--data", str(fifo), "--output-dir", str(tmp_path / "run2")]) == 2
    assert "is not a regular file" in capsys.readouterr().err

    import shutil

    model = tmp_path / "model"
    shutil.copytree(make_tiny_model(tmp_path / "tiny"), model)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to("/dev/zero")  # a weights file inside a model folder
    assert train_main(["--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run3")]) == 2
    err = capsys.readouterr().err
    assert f"{model / 'model.safetensors'} is not a regular file" in err and "no file named" not in err, err


# ---- item 15: a huge line is cut before it is tokenized --------------------------------------------------------------
class Recording:
    """A tokenizer that records the length of every text it tokenizes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The SmolLM2 tokenizer, read from the embedded GGUF (no model conversion; the user's cache untouched)."""
    from torchdora.app.assets import load_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHDORA_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_tokenizer()


def reference_item(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """Tokenize everything, then cut as :func:`tokenize_example` documents: completion (+ eos) to max_length - 1
    on the right, then the prompt from the left after its BOS."""
    prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    completion = (tokenizer(example.completion, add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id])[: max_length - 1]
    room = max_length - len(completion)
    if len(prompt) > room:
        bos = [prompt[0]] if prompt[0] == tokenizer.bos_token_id and room > 1 else []
        prompt = bos + prompt[len(prompt) - (room - len(bos)):]
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def test_cutting_before_tokenizing_gives_the_tokens_of_tokenizing_everything(smollm2):
    reviews = [e for _, part in load_dataset(max_eval=40).items() for e in part[:40]]
    text = " ".join(e.prompt for e in reviews)  # ~24 000 characters of real review text, newlines included
    for max_length in (8, 32, 100):
        for start in range(0, 4000, 997):  # texts starting at different characters, mid-word too
            example = Example(text[start:], text[start + 10: start + 10 + 4 * max_length])
            recording = Recording(smollm2)
            assert tokenize_example(recording, example, max_length) == reference_item(smollm2, example, max_length)
            assert max(recording.lengths) < len(example.prompt)  # a piece was tokenized, not the whole text
    rng = random.Random(0)
    unusual = ["x" * 20000, "".join(rng.choice("0123456789") for _ in range(20000)), ("word" + " " * 37) * 800,
               "".join(rng.choice("ab cdé漢字\n.,;1234") for _ in range(20000))]  # one word, digits, spaces, mixed
    for other in unusual:
        example = Example(other, other[:2000])  # the completion too long: cut on the right
        assert tokenize_example(smollm2, example, 32) == reference_item(smollm2, example, 32)
    turns = (("user", text[:3000]), ("assistant", "positive"), ("user", text[3000:9000]), ("assistant", "no"))
    full = smollm2(render_chat(smollm2, turns), add_special_tokens=False)["input_ids"]
    item = tokenize_chat(smollm2, turns, 32)
    assert item["input_ids"] == full[-32:]
    assert smollm2.decode([t for t in item["labels"] if t != IGNORE_INDEX]) == "no<|im_end|>\n"


def test_a_long_chat_prompt_is_scored_as_when_tokenized_whole():
    """Scoring (add_eos=False) conditions on the earlier turns; a template that writes BOS keeps it after the cut."""
    from test_train import CHATML

    from torchdora.app.data.chat import chat_prompt_ids

    tokenizer, vocab = make_tiny_tokenizer(chat=True)
    tokenizer.chat_template = "<s>" + CHATML
    turns = (("user", " ".join(FILLER * 40)), ("assistant", "good"), ("user", " ".join(FILLER * 30)),
             ("assistant", "bad"))
    example = Example("transcript", "bad", messages=turns)
    for max_length in (8, 16):
        item = tokenize_example(Recording(tokenizer), example, max_length, add_eos=False)
        prompt = chat_prompt_ids(tokenizer, turns)  # everything tokenized, then cut after the BOS
        prompt = prompt[:1] + prompt[len(prompt) - (max_length - 2):]
        assert prompt[0] == vocab["<s>"]
        assert item == {"input_ids": prompt + [vocab["bad"]], "labels": [IGNORE_INDEX] * len(prompt) + [vocab["bad"]]}


def test_a_huge_single_line_is_cut_before_it_is_tokenized(smollm2, tmp_path):
    unit = "the film was a long, slow and very moving story. "
    huge = Example(unit * 100_000, " positive")  # 5 MB, one line
    recording = Recording(smollm2)
    item = tokenize_example(recording, huge, 32)
    assert max(recording.lengths) <= 64 * 1024  # never the whole 5 MB
    # the text repeats, so its last tokens are those of any long enough repetition
    assert item == reference_item(smollm2, Example(unit * 50, " positive"), 32)
    path = tmp_path / "huge.jsonl"
    write_jsonl(path, [{"prompt": huge.prompt if i == 0 else f"Q{i}", "completion": " positive"} for i in range(10)])
    row = next(e for e in load_file(path) if len(e.prompt) > 1000)
    assert tokenize_example(Recording(smollm2), row, 32) == item
    assert torch.tensor(item["input_ids"]).shape == (32,)
