"""Guards for every test: a test may not leak environment variables, process groups or threads into the
pytest process (multi-rank work belongs inside shoal.testing.run_ranks, in child processes)."""

import os
import threading

import pytest

# Set by pytest itself, and by torch's lazy import of torch._dynamo (the first optimizer step of a process).
_ALLOWED = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}


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
