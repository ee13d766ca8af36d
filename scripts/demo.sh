#!/usr/bin/env bash
# Quick start, part 1: set up and train the PyTorch MNIST demo on 2 processes on this machine.
# Extra arguments go to the example (e.g. --epochs 1).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" test
exec "$VENV/bin/shoal" run -np 2 "$VENV/bin/python" examples/pytorch_mnist.py "$@"
