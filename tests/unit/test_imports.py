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


#: The only places besides core/env.py that touch os.environ, each with the reason. Keyed by
#: (module, enclosing function): an exemption covers that one function, not its whole module.
_ENVIRON_EXEMPT = {
    # The harness's rank process sets its own launcher variables (RANK, WORLD_SIZE, SHOAL_INIT_FILE,
    # the test's env=) right after the fork and before init, as a launcher does for its children;
    # nothing else in the process has started yet.
    ("testing/__init__.py", "_child"): "writes the rank's launcher variables in the forked child",
}


def _environ_uses(tree: ast.AST) -> list[tuple[str, int]]:
    """(enclosing function, line) of every os.environ / os.getenv / os.putenv use and of every
    ``from os import environ|getenv|putenv``."""
    found = []

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "unsetenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            found.append((func, node.lineno))
        if isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(a.name in ("environ", "getenv", "putenv", "unsetenv") for a in node.names):
            found.append((func, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "<module>")
    return found


def test_only_env_reads_os_environ():
    """core/env.py is the one reader (and writer, through set_default_env / export_env); the launcher
    passes its workers' variables through env.export_env too, so runner/ needs no exemption."""
    offenders, used = [], set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "core/env.py":
            continue
        for func, line in _environ_uses(ast.parse(path.read_text())):
            if (rel, func) in _ENVIRON_EXEMPT:
                used.add((rel, func))
            else:
                offenders.append(f"{rel}:{line} (in {func})")
    assert not offenders, f"only shoal/core/env.py may touch os.environ: {offenders}"
    assert used == set(_ENVIRON_EXEMPT), f"stale exemptions: {set(_ENVIRON_EXEMPT) - used}"


def test_environ_check_sees_every_spelling():
    code = ("import os\nfrom os import getenv\nx = os.environ.get('A')\n"
            "def f():\n    os.putenv('B', '1')\n")
    assert [f for f, _ in _environ_uses(ast.parse(code))] == ["<module>", "<module>", "f"]


def test_every_module_has_all():
    missing = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
               if "__all__" not in p.read_text() and p.name != "__main__.py"]
    assert not missing, f"modules without __all__: {missing}"
