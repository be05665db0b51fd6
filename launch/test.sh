#!/usr/bin/env bash
# Install simmim-swin with its test extra into the current Python environment, lint, and run the test suite.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k timm -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -e ".[test]"
ruff check .
# pytest exits 5 when it collects no tests; with `set -e` that fails this script like any other failure
python -m pytest "$@"
