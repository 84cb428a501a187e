#!/usr/bin/env bash
# README command 2: lint, format check, the type checker over src/, then the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pyproject.toml [tool.pyright]: src/, standard mode, no unneeded `# type: ignore`. The version is pinned
# (requirements-dev.lock): no look-up of newer releases (the wrapper asks PyPI on every run otherwise).
PYRIGHT_PYTHON_IGNORE_WARNINGS=1 .venv/bin/pyright
.venv/bin/python -m pytest -q
