"""Library noise, dropped once: the CLI, every flow process and the training entrypoint call :func:`quiet`.

What is dropped is known and harmless, each with its reason below. Every other Python warning is routed through
logging as one line ("WARNING culbot.warnings: UserWarning: ... (file.py:12)"), instead of the two lines of
``warnings.warn`` (the message, then the source line ``  warnings.warn(``) that reached the run logs as INFO.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

# Progress bars: a run log and a captured subprocess show each redraw as a line of its own. The training entrypoint
# logs progress itself (step lines with elapsed time and ETA); the stages log counts and rates.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}

# (logger name, message pattern): log records that say nothing a culbot user can act on.
HARMLESS_RECORDS = [
    # DeepSpeed says this at import on every machine without a GPU (CPU profiles, CI, the serving host): expected there.
    ("DeepSpeed", re.compile(r"Setting accelerator to CPU")),
    # bitsandbytes tries to download an optional CPU kernel from the Hub at import, and falls back to its own: culbot
    # runs offline and never wants code fetched at run time.
    ("bitsandbytes.backends.cpu.ops", re.compile(r"Failed to load CPU gemm_4bit_forward")),
    ("kernels._internals.hf_hub", re.compile(r"Skipping publisher trust check for 'kernels-community/")),   # the same attempt, offline
]

# (category, message pattern) of Python warnings that are not the user's business.
HARMLESS_WARNINGS = [
    # Libraries announcing their next versions (transformers' is_gradient_checkpointing rename, ...).
    (FutureWarning, r""),
    # peft looks up the base model's config on the Hub to see whether the vocabulary was resized; culbot's tiny and
    # local bases have no Hub config, and culbot never resizes the vocabulary (pad tokens come from the vocabulary).
    (UserWarning, r"Could not find a config file in "),
]

log = logging.getLogger("culbot.warnings")


class _DropHarmless(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning("%s: %s (%s:%s)", category.__name__, str(message).strip().replace("\n", " "), os.path.basename(filename), lineno)


def quiet() -> None:
    """Drop the known harmless noise and send every other warning through logging as one line. Idempotent."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name, pattern in HARMLESS_RECORDS:
        # on the very logger that logs it (a logger's filter sees only its own records); filters survive the library's own
        # set-up of its logger (DeepSpeed's resets the level and the handlers)
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropHarmless(pattern))
    for category, pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    warnings.showwarning = _one_line
