#!/usr/bin/env bash
# Quick start, part 2: set up and run the test suite (unit, multi-rank, launcher, Keras backends).
# Extra arguments go to pytest. SHOAL_SKIP_KERAS=1 skips installing TensorFlow/JAX (their tests then skip).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
if [ "${SHOAL_SKIP_KERAS:-0}" != "1" ]; then
  # CPU builds of the Keras backends, pinned in constraints.txt (~2 GB installed).
  pip_install -c constraints.txt keras tensorflow-cpu jax jaxlib
fi
exec "$VENV/bin/python" -m pytest -q "$@" tests
