#!/usr/bin/env bash
# Install simmim-swin with its test extra into the current Python environment, lint, and run the test suite.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k timm -x`). CI runs it without arguments: everything.
# The quick lane for the edit-test loop leaves out the tests marked slow (whole runs, real processes) and keeps a
# quick test of every test module: `bash launch/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# the real labelled data the Fashion-MNIST tests and presets read (Debian's package; no download at run time)
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
        || echo "warning: could not install dataset-fashion-mnist; its tests will be skipped" >&2
fi
ruff check .
# pytest exits 5 when it collects no tests; with `set -e` that fails this script like any other failure
python -m pytest "$@"
