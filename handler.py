"""RunPod Hub entry point: the Hub looks for a handler.py at the repository root. It starts the same
serverless worker as the image's command, `python -m multitalk_worker.worker`
(src/multitalk_worker/worker.py)."""

from multitalk_worker.worker import main

if __name__ == "__main__":
    main()
