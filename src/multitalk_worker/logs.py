"""Log set-up shared by the worker, the local API and the CLI: how quiet the model libraries are."""

from __future__ import annotations

import logging


def quiet_model_libraries(*, verbose: bool) -> None:
    """transformers' and diffusers' load reports (unused keys, progress bars) only when verbose. Through
    their own verbosity switches: importing them resets their loggers' levels."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        library.set_verbosity(logging.INFO if verbose else logging.ERROR)
        if verbose:
            library.enable_progress_bar()
        else:
            library.disable_progress_bar()
