"""torchdora.app.train on a tiny random Llama with a word-level tokenizer, all offline in tmp_path.

The helpers here (tiny model folder, tiny sentiment data) are imported by the other training tests.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torchdora
from torchdora.app import train as train_mod
from torchdora.app.train import TrainConfig, TrainingDiverged, config_differences, lr_factor, train
from torchdora.app.train.config import resume_changes

POSITIVE = "good great fun wonderful brilliant moving superb charming".split()
NEGATIVE = "bad awful boring dull terrible weak messy tedious".split()
FILLER = "the film movie story plot acting was is a very quite and but".split()
N_ROWS = 120


# ---- helpers shared with the other training tests ---------------------------------------------------------
def write_tiny_data(folder: Path, n: int = N_ROWS, seed: int = 0) -> Path:
    """A JSONL sentiment task whose label is given away by two sentiment words among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"prompt": f"Review: {' '.join(words)} {i}\nIs this review positive or negative? Answer:",
                     "completion": f" {label}", "options": [" positive", " negative"]})
    path = Path(folder) / "tiny.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


#: ChatML, the template of SmolLM2/Qwen-style instruction models (no default system prompt here)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(chat: bool = False):
    """The word-level tokenizer of the tiny data; with ``chat``, ChatML markers, roles and :data:`CHATML`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"] + (CHAT_SPECIALS if chat else [])
    words = sorted(set(POSITIVE + NEGATIVE + FILLER + "Review Is this review positive or negative Answer".split()
                       + [str(i) for i in range(N_ROWS)] + ["?", ":"]
                       + ("system user assistant".split() if chat else [])))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=CHAT_SPECIALS if chat else None)
    if chat:
        tokenizer.chat_template = CHATML
    return tokenizer, vocab


def make_tiny_model(folder: Path, seed: int = 0, chat: bool = False) -> Path:
    """A 2-layer random Llama plus a word-level tokenizer covering the tiny data, saved like save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, vocab = make_tiny_tokenizer(chat)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def tiny_config(model: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model), data=str(data), output_dir=str(out), steps=8, batch_size=4, lr=1e-2,
                  warmup_steps=2, rank=4, alpha=8, eval_every=4, checkpoint_every=4, max_eval=16,
                  targets="q_proj,v_proj,up_proj,down_proj")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~10x faster than several threads waiting on each other (2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), write_tiny_data(root / "data")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- learning-rate schedule --------------------------------------------------------------------------------
def test_lr_factor_matches_hand_computed_values():
    # warm-up: (step + 1) / (warmup + 1); then decay over the remaining total - warmup steps
    assert lr_factor(0, "linear", 4, 14) == pytest.approx(1 / 5)
    assert lr_factor(3, "linear", 4, 14) == pytest.approx(4 / 5)
    assert lr_factor(4, "linear", 4, 14) == pytest.approx(1.0)
    assert lr_factor(9, "linear", 4, 14) == pytest.approx(0.5)
    assert lr_factor(14, "linear", 4, 14) == pytest.approx(0.0)
    assert lr_factor(9, "cosine", 4, 14) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(13, "constant", 4, 14) == 1.0


# ---- configuration ------------------------------------------------------------------------------------------
def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="steps or epochs, not both"):
        TrainConfig(steps=3, epochs=1)
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="qlora")
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got rank=0"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="needs --method dora"):
        TrainConfig(method="lora", magnitude_only="o_proj")
    with pytest.raises(ValueError, match="recompute='q_proj' needs --method dora"):
        TrainConfig(method="lora", recompute="q_proj")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rnak'\]"):
        TrainConfig.from_mapping({"rnak": 4})


def test_recompute_reaches_the_adapter_config():
    config = TrainConfig(targets="q_proj,v_proj", recompute=["q_proj"]).dora_config()
    assert config.recompute_modules == ("q_proj",)


def test_magnitude_only_modules_are_targeted_too():
    config = TrainConfig(targets="q_proj,v_proj", magnitude_only="o_proj,down_proj").dora_config()
    assert config.target_modules == ("q_proj", "v_proj", "o_proj", "down_proj")
    assert config.magnitude_only_modules == ("o_proj", "down_proj")


def test_config_differences_lists_only_run_fields():
    saved = TrainConfig(rank=8, output_dir="a").resolved().to_dict()
    assert config_differences(TrainConfig(rank=8, output_dir="b", eval_every=3), saved) == {}
    assert config_differences(TrainConfig(rank=4, lr=1e-3, max_eval=50), saved) == {"rank": (8, 4),
                                                                                    "max_eval": (200, 50)}
    # optimisation settings may change on resume: reported separately, not refused
    assert resume_changes(TrainConfig(rank=4, lr=1e-3), saved) == {"lr": (3e-4, 1e-3)}


# ---- a whole run --------------------------------------------------------------------------------------------
def test_train_writes_the_run_folder_and_learns(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "run"
    result = train(tiny_config(model_dir, data, out, steps=24, save_every=8))

    for name in ("config.json", "metrics.jsonl", "summary.json", "training.png", "adapter", "adapter-peft",
                 "checkpoint"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["rank"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["trainable_params"] == result.trainable_params > 0
    assert summary["peak_rss_mb"] > 0 and summary["wall_time_s"] > 0
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    # the label words decide the completion: 24 steps at lr 1e-2 must lower the loss clearly
    first, last = sum(r["loss"] for r in steps[:4]) / 4, sum(r["loss"] for r in steps[-4:]) / 4
    assert last < first - 0.3, (first, last)
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-000008", "step-000016", "step-000024"]

    # the saved adapter (both formats) reproduces a changed model: it did something and loads back
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 5, 9, 11, 40, 3]])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = base(ids).logits
    outputs = []
    for folder in ("adapter", "adapter-peft", "snapshots/step-000024"):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        torchdora.load_adapter(model, out / folder)
        outputs.append(model(ids).logits)
    assert not torch.allclose(outputs[0], reference, atol=1e-3)
    # same fp32 tensors in both formats: identical up to kernel round-off
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-5, atol=1e-6)


def test_full_fine_tuning_snapshots_hold_the_state_dict(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "full"
    train(tiny_config(model_dir, data, out, method="full", steps=2, save_every=2, lr=1e-3, eval_every=0))
    from transformers import AutoModelForCausalLM

    tensors = load_file(out / "snapshots" / "step-000002" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert set(tensors) == set(base.state_dict())
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)  # the same tensors, saved twice
    assert not torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_full_fine_tuning_train_only_changes_only_the_named_weights(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "full-qv"
    train(tiny_config(model_dir, data, out, method="full", train_only="q_proj,v_proj", steps=2, lr=1e-2,
                      eval_every=0))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    named = {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert changed == named  # every q/v weight moved (the option does something), nothing else did


def test_train_only_is_refused_for_adapters_and_unknown_names(tiny, tmp_path):
    model_dir, data = tiny
    with pytest.raises(ValueError, match="needs --method full"):
        tiny_config(model_dir, data, tmp_path / "a", method="lora", train_only="q_proj")
    with pytest.raises(ValueError, match="q_prj.*closest names"):
        train(tiny_config(model_dir, data, tmp_path / "b", method="full", train_only="q_prj", eval_every=0))


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_bfloat16_mixed_precision_and_grad_accum_run(method, tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "bf16"
    result = train(tiny_config(model_dir, data, out, steps=2, grad_accum=2, dtype="bfloat16", method=method,
                               eval_every=0))
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    # grad_accum=2: every optimizer step saw two micro-batches of 4 examples
    assert result.steps == 2


# ---- errors before any long work -------------------------------------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the model's weights are loaded: the error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was found")

    monkeypatch.setattr("torchdora.app.assets.load_model_and_tokenizer", refuse)


def test_unknown_model_fails_early(tiny, tmp_path, no_model_loading):
    _, data = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_config(tmp_path / "no-such-model", data, tmp_path / "run"))


def test_missing_and_malformed_data_fail_early(tiny, tmp_path, no_model_loading):
    model_dir, _ = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_config(model_dir, tmp_path / "missing.jsonl", tmp_path / "run"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        train(tiny_config(model_dir, bad, tmp_path / "run"))


def test_empty_split_fails_early(tiny, tmp_path, no_model_loading):
    model_dir, data = tiny
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text(data.read_text())
    (folder / "validation.jsonl").write_text(data.read_text().splitlines()[0] + "\n")
    (folder / "test.jsonl").write_text("")
    with pytest.raises(ValueError, match="test split .* is empty"):
        train(tiny_config(model_dir, folder, tmp_path / "run"))


def test_targets_that_match_nothing_fail_before_loading(tiny, tmp_path, no_model_loading):
    model_dir, data = tiny
    with pytest.raises(ValueError, match=r"matches no module.*Closest module names that exist: \[.*q_proj"):
        train(tiny_config(model_dir, data, tmp_path / "run", targets="q_prj"))


def test_output_dir_with_a_run_is_not_overwritten(tiny, tmp_path, no_model_loading):
    model_dir, data = tiny
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(tiny_config(model_dir, data, tmp_path / "run"))


def test_resume_refuses_a_different_config(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "run"
    train(tiny_config(model_dir, data, out, steps=2, eval_every=0))
    with pytest.raises(ValueError, match=r"different configuration \(rank: checkpoint 4, now 8\)"):
        train(tiny_config(model_dir, data, out, steps=2, rank=8, lr=1e-3, resume=str(out)))
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        train(tiny_config(model_dir, data, tmp_path / "x", resume=str(tmp_path)))


def test_nan_loss_stops_with_advice_and_keeps_the_checkpoint(tiny, tmp_path):
    model_dir, data = tiny
    real = train_mod.compute_loss
    calls = {"n": 0}

    def nan_at_third_step(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    out = tmp_path / "run"
    advice = r"nan at step 3 .*checkpoint, with finite weights.*step 2.*--resume .* --lr 0.0025"
    with pytest.raises(TrainingDiverged, match=advice):
        train(tiny_config(model_dir, data, out, steps=6, checkpoint_every=2, eval_every=0), loss=nan_at_third_step)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert not (out / "summary.json").exists()


def test_epochs_with_grad_accum_count_a_short_last_step(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "epochs"
    # 96 training examples / batch 4 = 24 micro-batches; groups of 5 give 5 optimizer steps, the last of 4
    result = train(tiny_config(model_dir, data, out, steps=None, epochs=1, grad_accum=5, eval_every=0))
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert result.steps == 5 and [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert sum(r["tokens"] for r in steps) == sum(
        len(ids) for ids in _tokenized_train_lengths(model_dir, data))


def _tokenized_train_lengths(model_dir: Path, data: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    from torchdora.app.data import load_dataset, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = tokenize_examples(tokenizer, load_dataset(data, seed=0, max_eval=16).train, 96)
    return [item["input_ids"] for item in items]


# ---- live metrics, quiet logs, trackers, JSON without NaN -------------------------------------------------
def _strict_json(text: str):
    """``json.loads`` that refuses the bare ``NaN``/``Infinity`` Python's json writes by default."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_metrics_are_on_disk_at_every_step_while_the_run_goes(tiny, tmp_path):
    model_dir, data = tiny
    out = tmp_path / "run"
    seen = []
    real_loss = train_mod.compute_loss

    def loss_and_look(model, batch):
        # before the forward pass of step k + 1 the file must already hold steps 1..k (no checkpoint written yet)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        seen.append([_strict_json(line)["step"] for line in lines if "loss" in _strict_json(line)])
        return real_loss(model, batch)

    train(tiny_config(model_dir, data, out, steps=6, eval_every=0, checkpoint_every=0), loss=loss_and_look)
    assert seen == [list(range(1, k + 1)) for k in range(6)]
    assert not (tmp_path / "run" / "checkpoint" / "unused").exists()


def test_non_terminal_log_stays_short(tiny, tmp_path, capsys):
    model_dir, data = tiny
    train(tiny_config(model_dir, data, tmp_path / "run", steps=30, eval_every=10, checkpoint_every=0, log_every=10))
    captured = capsys.readouterr()
    log = captured.out + captured.err
    step_lines = [line for line in log.splitlines() if line.startswith("step ") and " loss " in line]
    assert [line.split()[1] for line in step_lines] == ["10/30", "20/30", "30/30"]
    assert all(word in step_lines[0] for word in ("lr", "tokens/s", "eta", "mem"))
    assert "\r" not in log  # no progress bar redraws
    assert len(log.splitlines()) <= 36, log


def test_tensorboard_tracker_writes_an_event_file(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    model_dir, data = tiny
    out = tmp_path / "run"
    train(tiny_config(model_dir, data, out, steps=2, eval_every=0, report_to="tensorboard"))
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = [e.value for e in accumulator.Scalars("train/loss")]
    recorded = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses == pytest.approx(recorded, rel=1e-6)  # float32 in the event file


def test_generative_data_gives_a_json_summary_with_null_accuracy(tiny, tmp_path):
    model_dir, _ = tiny
    rows = [{"prompt": f"Review: the film {i} was", "completion": " good" if i % 2 else " bad"} for i in range(40)]
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train(tiny_config(model_dir, data, out, steps=2, eval_every=1))
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["accuracy_before"] is None and summary["accuracy_after"] is None
    assert "no multiple-choice accuracy" in summary["accuracy_note"]
    assert math.isfinite(summary["perplexity_after"]) and summary["perplexity_after"] > 1
    assert summary["exact_match_examples"] > 0 and 0.0 <= summary["exact_match_after"] <= 1.0
    # every test example was evaluated (perplexity; exact match for these short answers), none for accuracy
    assert (summary["test_examples"], summary["exact_match_examples"], summary["accuracy_examples"]) == (4, 4, 0)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)


# ---- chat rows and packing ---------------------------------------------------------------------------------
def test_a_chat_file_trains_with_loss_on_assistant_tokens(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(60):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        rows.append({"messages": [{"role": "user", "content": f"Review {' '.join(words)} {i}"},
                                  {"role": "assistant", "content": label}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = make_tiny_model(tmp_path / "model", chat=True)
    out = tmp_path / "run"
    result = train(tiny_config(model_dir, data, out, steps=16, eval_every=0, packing=True))
    steps = [r["loss"] for r in read_metrics(out) if "loss" in r]
    # two trained tokens per conversation (the label and <|im_end|>), both learnable: the loss must fall
    assert sum(steps[-4:]) / 4 < sum(steps[:4]) / 4 - 0.3, steps
    assert result.perplexity_after < result.perplexity_before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_after"] is None and summary["perplexity_after"] > 0


def _loss(model, items, pad):
    from torchdora.app.data import collate

    return train_mod.compute_loss(model, collate(items, pad))


def test_packing_changes_nothing_when_nothing_is_packed_and_keeps_examples_apart(tiny):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from torchdora.app.data import load_dataset, pack_examples, tokenize_examples

    model_dir, data = tiny
    config = AutoConfig.from_pretrained(model_dir)
    config.initializer_range = 0.5  # large random weights: tokens depend clearly on their context, so a leak shows
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = tokenize_examples(tokenizer, load_dataset(data, seed=0).train[:6], 96)
    longest = max(len(i["input_ids"]) for i in items)
    with torch.no_grad():
        # max_length below twice the shortest example: every row holds one example, padded like the unpacked batch
        rows = pack_examples(items, longest + 1)
        assert len(rows) == len(items)
        (plain, n), (packed, n_packed) = _loss(model, items, 0), _loss(model, rows, 0)
        assert n == n_packed
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)  # fp32, same tokens, another mask path

        # several examples per row: the packed loss is the token-weighted mean of the examples run alone
        rows = pack_examples(items, 4 * longest)
        assert len(rows) < len(items)
        alone = [_loss(model, [item], 0) for item in items]
        reference = sum(loss * count for loss, count in alone) / sum(count for _, count in alone)
        torch.testing.assert_close(_loss(model, rows, 0)[0], reference, rtol=1e-5, atol=1e-6)
        # the check can fail: the same rows with one attention span over the whole row give another loss
        leaky = [{k: v for k, v in row.items() if k != "position_ids"} for row in rows]
        assert abs(float(_loss(model, leaky, 0)[0] - reference)) > 1e-3


def test_progress_is_a_bar_on_a_terminal_and_sparse_lines_otherwise(capsys):
    from torchdora.app.train.outputs import Progress

    lines = Progress(total=25, initial=0, enabled=True, every=10, seconds=3600, terminal=False)
    for _ in range(25):
        lines.update(1.5, 1e-4, 1000.0)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["10/25", "20/25", "25/25"]  # every 10 steps and the last
    assert lines.bar is None
    bar = Progress(total=3, initial=1, enabled=True, every=10, terminal=True)
    bar.update(1.5, 1e-4, 1000.0)
    assert bar.bar is not None and bar.bar.n == 2
    bar.close()
    assert not capsys.readouterr().out  # the bar draws on stderr, no log lines


def test_a_missing_tracker_package_fails_before_the_model_loads(tiny, tmp_path, no_model_loading, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    model_dir, data = tiny
    with pytest.raises(ModuleNotFoundError, match=r"--report-to wandb needs the package 'wandb': "
                                                  r"pip install 'torchdora\[wandb\]'"):
        train(tiny_config(model_dir, data, tmp_path / "run", report_to="wandb"))


def test_batch_size_per_device_or_over_all_processes(tmp_path):
    from torchdora.app.train.options import config_from_args

    # per device: multiplied out by the process count, then cleared so a resumed run keeps the global size
    resolved = TrainConfig(per_device_batch_size=4).resolved(num_processes=2)
    assert (resolved.batch_size, resolved.per_device_batch_size) == (8, None)
    assert TrainConfig(batch_size=6).resolved(num_processes=3).batch_size == 6  # counts all processes
    assert TrainConfig().resolved(num_processes=4).batch_size == 8  # the default: 8 over all processes
    with pytest.raises(ValueError, match="batch_size .* or per_device_batch_size .*, not both"):
        TrainConfig(batch_size=8, per_device_batch_size=2)
    with pytest.raises(SystemExit):
        config_from_args(["--batch-size", "8", "--per-device-batch-size", "2"])
    # an old config file's batch_size gives way to a per-device size given on the command line
    config_file = tmp_path / "old.yaml"
    config_file.write_text("batch_size: 8\n")
    config = config_from_args(["--config", str(config_file), "--per-device-batch-size", "2"])
    assert (config.batch_size, config.per_device_batch_size) == (None, 2)
    # resuming with a per-device size that gives another global batch on this process count is refused
    saved = TrainConfig(batch_size=8).resolved().to_dict()
    assert config_differences(TrainConfig(per_device_batch_size=4), saved, num_processes=2) == {}
    assert config_differences(TrainConfig(per_device_batch_size=4), saved, num_processes=1) == {"batch_size": (8, 4)}


def test_fsdp_refuses_what_it_cannot_shard():
    from torchdora.app.train.sharding import use_fsdp

    with pytest.raises(ValueError, match="sharding must be one of"):
        TrainConfig(sharding="zero3")
    assert not use_fsdp(TrainConfig(sharding="fsdp"), num_processes=1, backend=None)  # nothing to shard
    assert not use_fsdp(TrainConfig(), num_processes=2, backend="gloo")  # DDP stays the default
    assert use_fsdp(TrainConfig(sharding="fsdp"), num_processes=2, backend="gloo")
    with pytest.raises(ValueError, match="full fine-tuning under torchrun uses the default --sharding none"):
        use_fsdp(TrainConfig(sharding="fsdp", method="full"), num_processes=2, backend="nccl")
    with pytest.raises(ValueError, match="gloo cannot all-gather bfloat16"):
        use_fsdp(TrainConfig(sharding="fsdp", dtype="bfloat16"), num_processes=2, backend="gloo")
    with pytest.raises(ValueError, match="--base-dtype bfloat16 needs GPUs"):
        use_fsdp(TrainConfig(sharding="fsdp", base_dtype="bfloat16"), num_processes=2, backend="gloo")
    with pytest.raises(ValueError, match="cannot shard a quantized base"):
        use_fsdp(TrainConfig(sharding="fsdp", quantize="nf4"), num_processes=2, backend="nccl")
    assert use_fsdp(TrainConfig(sharding="fsdp", dtype="bfloat16"), num_processes=2, backend="nccl")
