"""Log set-up shared by the worker, the local API and the CLI: how quiet the model libraries are."""

from __future__ import annotations

import logging


def quiet_model_libraries(*, verbose: bool) -> None:
    """transformers' and diffusers' load reports (unused keys, progress bars) only when verbose."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
