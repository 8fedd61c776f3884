#!/usr/bin/env bash
# Install the package with its test extras and run the test suite (CPU-sized; what CI runs).
DIFFRWKV_EXTRAS=test
source "$(dirname "$0")/_env.sh"
exec python -m pytest -q "$@"
