"""multitalk-worker: MultiTalk talking-video generation as a RunPod worker, CLI and local HTTP API."""

__version__ = "0.1.0"
