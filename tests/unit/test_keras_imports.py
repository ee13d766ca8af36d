"""``import shoal.keras`` without Keras, or without the backend ``KERAS_BACKEND`` names, fails at once with
the install line of the matching extra (``shoal[keras]``, ``shoal[jax]``, ``shoal[tensorflow]``).

These run wherever the packages are installed (CI installs all of them): each case is a fresh Python in
which the package is made unimportable before ``import shoal.keras``, by a meta-path finder that answers
as the import system does for a package that is not installed (``ModuleNotFoundError`` with ``name`` set
to the top-level package), and in one case by ``sys.modules[name] = None``, which reports the submodule
Keras asked for (``tensorflow.python``). A fresh process per case: Keras reads ``KERAS_BACKEND`` once, at
its first import, and the pytest process must not import TensorFlow or JAX (5-30 s each here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Optional

import pytest

#: A fresh interpreter importing torch, then failing inside Keras' import: ~2-4 s here; 120 s for a
#: loaded 2-core machine.
_TIMEOUT_S = 120

_SCRIPT = """
import json, sys

BLOCKED = set(sys.argv[1].split(",")) - {""}
NONE = set(sys.argv[2].split(",")) - {""}


class Uninstalled:
    '''What the import system says about a package that is not installed.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Uninstalled())
for name in NONE:
    sys.modules[name] = None
try:
    import shoal.keras  # noqa: F401
except Exception as exc:
    print("RESULT " + json.dumps({"type": type(exc).__name__, "message": str(exc)}))
else:
    print("RESULT " + json.dumps({"type": None, "message": ""}))
"""


def _import_shoal_keras(tmp_path, backend: Optional[str], *, blocked=(), none=()) -> dict:
    """Run ``import shoal.keras`` in a fresh interpreter; returns the exception's type name and message.
    The child gets its own session, and the whole session is killed on timeout."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "KERAS_HOME": str(tmp_path / "keras"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, ",".join(blocked), ",".join(none)], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"import shoal.keras (KERAS_BACKEND={backend}) did not finish within {_TIMEOUT_S} s")
    assert proc.returncode == 0, stderr
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, (stdout, stderr)
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("backend", [None, "jax"])
def test_without_keras_names_the_keras_extra(tmp_path, backend):
    # KERAS_BACKEND unset: Keras' default, tensorflow, is what the message names.
    out = _import_shoal_keras(tmp_path, backend, blocked=["keras"])
    assert out["type"] == "ImportError", out
    msg = out["message"]
    assert "pip install 'shoal[keras]'" in msg and "no module named 'keras'" in msg and "HINT" in msg, out
    assert f"KERAS_BACKEND={backend or 'tensorflow'}" in msg, out


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_without_the_backend_names_its_extra(tmp_path, backend):
    out = _import_shoal_keras(tmp_path, backend, blocked=[backend])
    assert out["type"] == "ImportError", out
    msg = out["message"]
    assert f"pip install 'shoal[{backend}]'" in msg and f"no module named '{backend}'" in msg, out
    assert f"KERAS_BACKEND={backend}" in msg and "HINT" in msg, out


def test_a_missing_submodule_names_the_package(tmp_path):
    # sys.modules['tensorflow'] = None makes Keras' `import tensorflow.python...` fail on the submodule.
    out = _import_shoal_keras(tmp_path, "tensorflow", none=["tensorflow"])
    assert out["type"] == "ImportError", out
    assert "pip install 'shoal[tensorflow]'" in out["message"], out
    assert "no module named 'tensorflow'" in out["message"], out
