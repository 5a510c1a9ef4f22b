"""Quality evaluation of KV-cache eviction on real models: ``python -m adakv_ops.eval --help``.

RULER-style retrieval tasks (``tasks``), eviction loss and agreement measures (``runner``),
offline models from PyPI (``models``), tables and plots (``report``). See docs/eval.md.
"""

from .models import OFFLINE_MODELS, load_model
from .runner import METHODS_ALL, SETTINGS, PromptBuilder, run_sample, run_text
from .tasks import TASKS, make_samples

__all__ = ["OFFLINE_MODELS", "load_model", "METHODS_ALL", "SETTINGS", "PromptBuilder",
           "run_sample", "run_text", "TASKS", "make_samples"]
