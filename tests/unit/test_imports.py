"""Import hygiene: importing shoal does nothing; imports flow one way (frontends -> core)."""

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "shoal"


def test_import_shoal_does_nothing():
    code = ("import os, sys, threading; before = dict(os.environ); n = threading.active_count(); "
            "import shoal; assert dict(os.environ) == before, 'env written'; "
            "assert threading.active_count() == n, 'thread started'; "
            "assert 'torch' not in sys.modules, 'torch imported by import shoal'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_core_imports_nothing_of_ours_outside_core():
    """shoal.core may import torch and torch.distributed only: never torch.nn/optim, keras or frontends."""
    bad = []
    for path in (SRC / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.startswith(("shoal.torch", "shoal.keras", "shoal.parallel", "shoal.runner",
                                    "torch.nn", "torch.optim", "keras", "tensorflow", "jax")):
                    bad.append(f"{path.relative_to(SRC)}: {name}")
    assert not bad, f"shoal.core must not import frontends or torch.nn/optim: {bad}"


def test_only_env_reads_os_environ():
    offenders = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel in ("core/env.py",) or rel.startswith(("testing/", "runner/")):
            continue  # the env reader itself; the harness and launcher set up child environments
        code = [n for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Attribute) and n.attr in ("environ", "getenv", "putenv")
                and isinstance(n.value, ast.Name) and n.value.id == "os"]
        if code:
            offenders.append(rel)
    assert not offenders, f"only shoal/core/env.py may read os.environ: {offenders}"


def test_every_module_has_all():
    missing = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
               if "__all__" not in p.read_text() and p.name != "__main__.py"]
    assert not missing, f"modules without __all__: {missing}"
