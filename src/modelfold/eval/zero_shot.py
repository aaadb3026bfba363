"""Zero-shot tasks through lm-eval's Python API on an in-memory (folded) model.

lm-eval is an optional extra (`pip install 'modelfold[eval]'`). Any task lm-eval knows works
(e.g. "arc_easy", "hellaswag", "piqa", "winogrande" for users with internet); offline, point
`include_path` at a folder of task YAML files whose `dataset_path: json` reads local files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from modelfold.errors import FoldError


def zero_shot(model: nn.Module, tokenizer, tasks: Iterable[str], *,
              include_path: str | Path | None = None, limit: int | float | None = None,
              batch_size: int = 1, num_fewshot: int | None = None,
              device: str | None = None) -> dict[str, dict[str, float]]:
    """lm-eval metrics per task, e.g. {"arc_easy": {"acc,none": 0.61, ...}}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise FoldError(f"zero-shot evaluation needs lm-eval and accelerate ({exc}): "
                        "pip install 'modelfold[eval]'.") from exc
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise FoldError("zero_shot: give at least one task name.")
    if include_path is not None and not Path(include_path).is_dir():
        raise FoldError(f"zero_shot: include_path {include_path} is not a folder.")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise FoldError(f"zero_shot: unknown lm-eval tasks {unknown} (add their YAML folder with "
                        "`include_path=`).")
    device = device or str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                          limit=limit, num_fewshot=num_fewshot,
                                          log_samples=False)
    except ConnectionError as exc:  # datasets: offline, or the Hub unreachable
        raise FoldError(f"zero_shot: the datasets of the tasks {tasks} could not be downloaded "
                        f"({exc}). Connect to the internet once (datasets are cached), or give "
                        "include_path= a folder of task YAML files that read local files."
                        ) from exc
    return {task: {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in results["results"].items()}
