#!/usr/bin/env bash
# Install simmim-swin with its test extra into the current Python environment, lint, and run the test suite.
# Extra arguments go to pytest (e.g. `bash launch/test.sh -k timm -x`).
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
