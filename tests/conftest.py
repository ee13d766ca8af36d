"""Guards for every test: a test may not leak environment variables, process groups or threads into the
pytest process (multi-rank work belongs inside shoal.testing.run_ranks, in child processes)."""

import atexit
import os
import shutil
import tempfile
import threading

import pytest

# Set by pytest itself, and by torch's lazy import of torch._dynamo (the first optimizer step of a process).
_ALLOWED = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


def pytest_configure(config):
    """Every process the suite starts keeps its temporary files under one directory, removed at exit:
    TensorFlow's autograph leaves a generated file per traced function in the temporary directory (about 20
    per Keras run, never removed), which piled up in /tmp. Removed by an exit handler registered before
    multiprocessing's own (they run last first), so that multiprocessing has removed its directory inside."""
    made = tempfile.mkdtemp(prefix="shoal-tests-")
    atexit.register(shutil.rmtree, made, True)
    os.environ["TMPDIR"] = made
    tempfile.tempdir = None  # tempfile reads TMPDIR again


@pytest.fixture(autouse=True)
def _no_leaks():
    env_before = {k: v for k, v in os.environ.items() if k not in _ALLOWED}
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    leaked_env = sorted(k for k in os.environ if (k not in env_before or os.environ[k] != env_before[k])
                        and k not in _ALLOWED)
    for k in leaked_env:  # restore first, so one leak does not fail every later test
        if k in env_before:
            os.environ[k] = env_before[k]
        else:
            del os.environ[k]
    assert not leaked_env, f"test leaked environment variables: {leaked_env}"
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("test left a torch.distributed process group initialized in the pytest process")
    new_threads = [t for t in threading.enumerate()
                   if t.ident not in threads_before and t.is_alive() and not t.daemon]
    assert not new_threads, f"test leaked threads: {[t.name for t in new_threads]}"
