"""Log set-up shared by the doors: the worker's and the local API's format and levels, and how quiet the
model libraries are."""

from __future__ import annotations

import logging
import sys


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


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Our loggers at `level`, each line with its level and logger name; boto/urllib3 at WARNING at least
    (their DEBUG logs carry signed headers); transformers/diffusers at ERROR unless DEBUG (their load
    reports); the runpod SDK at INFO at least (at DEBUG it prints every job's input and output, payloads
    included). `force`: importing the runpod SDK installs a root handler without level or name
    (runpod/serverless/utils/rp_upload.py), which would make a plain basicConfig do nothing."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("multitalk_worker").setLevel(level)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    quiet_model_libraries(verbose=level == "DEBUG")
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().level = {"DEBUG": "INFO", "WARNING": "WARN"}.get(level, level)
