"""The local door: the job contract over HTTP for a GPU box without RunPod.

app.py: the FastAPI app and its routes (and `main`); jobs.py: the in-memory job queue; guard.py: the request
guard (Host, origin, token); openapi.py: the published schema; web/: the try-it page.

    MULTITALK_WEIGHTS=tiny python -m multitalk_worker.local_api --port 8000
"""
