"""Model cards: the ``README.md`` of an adapter folder, a PEFT export and a merged model, as PEFT and TRL write them.

A card opens with the YAML header the Hugging Face hub reads (``base_model``, ``library_name``: ``peft`` for an
adapter, ``transformers`` for a merged or fully fine-tuned model; ``tags`` with the method, e.g. ``dora``;
``datasets``; ``metrics``), then says what the folder is, how to load it, the measured results and the training
configuration. Written atomically (:func:`torchdora.files.atomic_write_bytes`). Train writes the cards of
``adapter/``, ``adapter-peft/``, ``best-adapter/`` and ``model/``; ``torchdora merge`` the merged folder's, from the
run folder the adapter came from (its ``config.json`` and ``summary.json``) when there is one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from torchdora.files import atomic_write_bytes

__all__ = ["METHOD_TAGS", "card_text", "write_card", "write_adapter_card", "summary_results",
           "write_merged_card"]

#: ``TrainConfig.method`` -> hub tags (the method's own name first)
METHOD_TAGS = {"dora": ["dora", "lora"], "lora": ["lora"], "vera": ["vera"], "dvora": ["dvora", "vera", "dora"],
               "full": ["full-fine-tuning"]}
#: ``TrainConfig.method`` -> how the method is written
METHOD_NAMES = {"dora": "DoRA", "lora": "LoRA", "vera": "VeRA", "dvora": "DVoRA", "full": "Full"}
#: results shown in a card (``summary.json`` keys), in order, and the hub metric each one is
RESULT_KEYS = {"accuracy_after": "accuracy", "perplexity_after": "perplexity", "exact_match_after": "exact_match",
               "final_loss": "loss", "best_step": None, "best_val_loss": "loss", "best_val_accuracy": "accuracy"}


def _dataset_name(data: str | None) -> str:
    """A dataset as the hub names it: a hub id stays, a local file or folder becomes its name."""
    if data is None:
        return "rotten_tomatoes"
    return Path(data).name if os.path.sep in data or Path(data).exists() else data


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def card_text(base_model: str, library_name: str, config: Mapping[str, Any], results: Mapping[str, Any],
              title: str, usage: str, note: str = "") -> str:
    """The card: YAML header, what it is, how to load it, results, the training configuration."""
    import yaml

    method = str(config.get("method", "dora"))
    shown = {k: v for k, v in results.items() if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
    metrics = sorted({RESULT_KEYS[k] for k in shown if RESULT_KEYS.get(k)})
    data = config.get("data")
    datasets = [_dataset_name(d) for d in data] if isinstance(data, (list, tuple)) else [_dataset_name(data)]
    header = {"base_model": base_model, "library_name": library_name, "pipeline_tag": "text-generation",
              "tags": ["torchdora", *METHOD_TAGS.get(method, [method])] + (["peft"] if library_name == "peft" else []),
              "datasets": datasets, "metrics": metrics}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
             f"{METHOD_NAMES.get(method, method)} fine-tuning of `{base_model}` on "
             f"{' + '.join(f'`{d}`' for d in datasets)} with torchdora "
             "(DoRA: Liu et al., ICML 2024, arXiv 2402.09353)." + (f" {note}" if note else ""), "",
             "## Usage", "", "```python", usage.strip(), "```", "", "## Results", ""]
    if results:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_number(v)} |" for k, v in results.items()]
    else:
        lines.append("No results were recorded.")
    lines += ["", "## Training configuration", "", "```json", json.dumps(dict(config), indent=2, default=str), "```",
              ""]
    return "\n".join(lines)


def write_card(folder: str | os.PathLike, text: str) -> Path:
    path = Path(folder) / "README.md"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def write_adapter_card(folder: str | os.PathLike, config: Mapping[str, Any], results: Mapping[str, Any],
                       note: str = "", peft: bool = False) -> Path:
    """``README.md`` of a torchdora adapter folder (``peft``: of its PEFT-format export)."""
    from torchdora.app.assets import recorded_base_name

    base = recorded_base_name(config.get("model"))
    if peft:
        usage = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained({base!r})\n"
                 f"model = PeftModel.from_pretrained(model, {str(Path(folder))!r})")
    else:
        usage = ("import torchdora\nfrom transformers import AutoModelForCausalLM\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained({base!r})\n"
                 f"torchdora.load_adapter(model, {str(Path(folder))!r})")
    method = str(config.get("method", "dora"))
    title = f"{METHOD_NAMES.get(method, method)} adapter for {Path(base).name}"
    return write_card(folder, card_text(base, "peft", config, results, title, usage, note))


def summary_results(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The results of a run's ``summary.json`` that a card shows."""
    return {k: summary[k] for k in RESULT_KEYS if k in summary}


def write_merged_card(folder: str | os.PathLike, adapter: str | os.PathLike, base_model: str,
                      dtype: str) -> Path:
    """``README.md`` of a merged model folder: its base, and the run's configuration and results when the adapter
    comes from a run folder (otherwise the adapter's own configuration)."""
    from torchdora.app.run_folder import run_of_adapter

    found = run_of_adapter(adapter)
    if found is not None:
        config, summary = found
        results = summary_results(summary)
    else:
        from torchdora.io import read_adapter

        dora = read_adapter(adapter)[0]
        config = {"method": "dora" if dora.use_dora else "lora", "adapter": str(adapter), "r": dora.r,
                  "alpha": dora.alpha}
        results = {}
    config = {**config, "merged_from": str(adapter), "saved_dtype": dtype}
    usage = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             f"model = AutoModelForCausalLM.from_pretrained({str(Path(folder))!r})\n"
             f"tokenizer = AutoTokenizer.from_pretrained({str(Path(folder))!r})")
    note = ("The adapter is merged into the weights (W' = m · V / ||V||, paper eq. 5): a plain transformers model, "
            "no adapter code needed.")
    return write_card(folder, card_text(base_model, "transformers", config, results,
                                        f"{Path(base_model).name} with a merged "
                                        f"{METHOD_NAMES.get(str(config.get('method', 'dora')), 'DoRA')} adapter",
                                        usage, note))
