#!/usr/bin/env bash
# The test suite in one command: install what the tests need, then run them all from the repository root
# (CI runs this). Arguments go to pytest (e.g. -m "not integration" to skip the slow real-model tests).
source "$(dirname "$0")/_install.sh" test
cd "$ROOT"
python -m pytest -q "$@"
