#!/usr/bin/env bash
# README command 2: lint, format check, then the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q
