#!/usr/bin/env bash
# Every test of the project: the Rust workspace, then the Python package (built from this
# checkout by pip + maturin into a venv under target/) and its pytest suite (which uses the
# `openai`, `pydantic`, `jsonschema` and `numpy` packages from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace

venv="${TANDEM_TEST_VENV:-target/py-test-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# The dev profile (optimized, like the test profile above) reuses `cargo test`'s artifacts.
MATURIN_PEP517_ARGS="--profile dev" \
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ".[test]"
"$venv/bin/python" -m pytest -q crates/tandem-py/tests
