"""``torchdora eval --tasks ...``: lm-evaluation-harness tasks on a model with its adapter merged in.

The DoRA paper's commonsense suite (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA; paper section 5.1)
is made of such tasks. The harness runs on the in-memory model (``lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)``, ``lm_eval.simple_evaluate``), so no merged copy is written. Tasks are the harness's own
names, or those of task YAML files in ``--include-path`` (which may read local data, e.g. ``dataset_path: json``
with ``dataset_kwargs: {data_files: ...}``: how to run offline). Needs the ``lmeval`` extra
(``pip install 'torchdora[lmeval]'``).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

__all__ = ["task_manager", "run_tasks", "format_results", "eval_tasks"]


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """A harness ``TaskManager`` that knows ``tasks``; an unknown name is refused with the closest known ones.

    With ``include_path`` holding every task asked for, the harness's own few thousand task files are not indexed.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError:
        raise ModuleNotFoundError("eval --tasks needs lm-evaluation-harness: pip install 'torchdora[lmeval]'") from None
    if include_path is not None:
        from pathlib import Path

        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--include-path {include_path} is not a folder of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        close = sorted({m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=3)})
        raise ValueError(f"unknown lm-evaluation-harness task(s) {unknown}; closest: {close or 'none'} "
                         "(`lm_eval ls tasks` lists them; local YAML tasks need --include-path DIR)")
    return manager


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], include_path: str | None = None,
              limit: int | None = None, batch_size: int = 16, manager: Any = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` (``metric_stderr`` too where the harness gives one) of ``model`` on ``tasks``;
    ``limit``: at most this many documents per task; ``manager``: a :func:`task_manager` already made."""
    manager = manager or task_manager(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=1000)
    results: dict[str, dict[str, float]] = {}
    for task, values in out["results"].items():
        results[task] = {key.split(",")[0]: float(v) for key, v in values.items()
                         if "," in key and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return results


def format_results(results: dict[str, dict[str, float]]) -> str:
    """One line per task and metric: ``task  metric  value ± stderr``."""
    lines = []
    for task, values in results.items():
        for metric, value in values.items():
            if metric.endswith("_stderr"):
                continue
            stderr = values.get(f"{metric}_stderr")
            spread = f" ± {stderr:.4f}" if stderr is not None and math.isfinite(stderr) else ""
            lines.append(f"{task}  {metric}  {value:.4f}{spread}")
    return "\n".join(lines)


def eval_tasks(config: Any) -> int:
    """``torchdora eval --tasks``: load base and adapter (merged), run the tasks, print one line per metric."""
    from torchdora.app.generate import load_generation_model

    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty: name lm-evaluation-harness tasks, e.g. --tasks arc_easy,piqa")
    manager = task_manager(tasks, config.include_path)  # a typo fails before the model loads
    model, tokenizer, _ = load_generation_model(config.model, config.adapter, config.base_dtype, config.quantize)
    print(format_results(run_tasks(model, tokenizer, tasks, config.include_path, config.max_eval, config.batch_size,
                                   manager)))
    return 0
