#!/usr/bin/env bash
# README command 2: lint, format check, the type checker over src/, then the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/pyright  # pyproject.toml [tool.pyright]: src/, standard mode, no unneeded `# type: ignore`
.venv/bin/python -m pytest -q
