#!/usr/bin/env bash
# Quick start, part 2: set up and run the test suite (unit, multi-rank, launcher). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec "$VENV/bin/python" -m pytest -q "$@" tests
