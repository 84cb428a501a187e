"""`python -m multitalk_worker.local_api`: serve the local HTTP API (app.main)."""

from multitalk_worker.local_api.app import main

raise SystemExit(main())
