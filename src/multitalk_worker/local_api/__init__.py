"""The local door: the job contract over HTTP for a GPU box without RunPod.

app.py: the FastAPI app and its routes (and `main`), RunPod's operations at the root and under an endpoint
id; envelope.py: a request's body (`input`, RunPod's `policy` and `webhook`); jobs.py: the in-memory job
queue (the policy's limits, the progress kept for /stream); webhook.py: the final status POSTed under the
address policy; guard.py: the request guard (Host, origin, token); openapi.py: the published schema; web/:
the try-it page.

    MULTITALK_WEIGHTS=tiny python -m multitalk_worker.local_api --port 8000
"""
