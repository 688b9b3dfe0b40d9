#!/usr/bin/env bash
# Every test of the project: the Rust workspace (installing etcd for its multi-host test),
# then the Python package (built from this checkout by pip + maturin into a venv under
# target/) and its pytest suite (which uses the `openai`, `pydantic`, `jsonschema` and `numpy`
# packages from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

# The multi-host test runs etcd and the workers in network namespaces: install Debian's
# etcd-server (and iproute2) when missing, where we may (root, apt-get).
if ! command -v etcd >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      etcd-server iproute2 >/dev/null
  else
    echo "warning: etcd or ip is missing and cannot be installed here (needs root and apt-get);" \
      "the multi-host test will fail" >&2
  fi
fi

cargo test --workspace
# The kernels again at the SIMD levels below this machine's best (attention takes its level
# from TANDEM_SIMD; the packed-matmul tests already loop over every supported level).
for level in avx2 scalar; do
  TANDEM_SIMD=$level cargo test -p tandem-kernels --test kernels
done

venv="${TANDEM_TEST_VENV:-target/py-test-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# The dev profile (optimized, like the test profile above) reuses `cargo test`'s artifacts.
MATURIN_PEP517_ARGS="--profile dev" \
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ".[test]"
"$venv/bin/python" -m pytest -q crates/tandem-py/tests
