#!/usr/bin/env bash
# Set up a virtual environment with the pinned dependencies and run the test suite.
# As root, Debian's chromium and chromium-driver are installed for the browser test
# (without them that test skips). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
    (apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null)) \
        || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
