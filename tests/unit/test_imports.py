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


def _imported_modules(path: pathlib.Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved against its package (``from ..torch
    import x`` in ``shoal/core/a.py`` is ``shoal.torch``)."""
    package = ["shoal", *path.relative_to(SRC).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append(node.module or "")
                continue
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                out.append(".".join(base + [node.module]))
            else:  # from .. import x: x may be a module of that package
                out += [".".join(base + [a.name]) for a in node.names]
    return out


_BANNED_IN_CORE = ("shoal.torch", "shoal.keras", "shoal.parallel", "shoal.runner", "shoal.testing",
                   "torch.nn", "torch.optim", "keras", "tensorflow", "jax")


def test_core_imports_nothing_of_ours_outside_core():
    """shoal.core may import torch and torch.distributed only: never torch.nn/optim, keras or frontends,
    by absolute or by relative import."""
    bad = [f"{path.relative_to(SRC)}: {name}" for path in (SRC / "core").rglob("*.py")
           for name in _imported_modules(path) if name.startswith(_BANNED_IN_CORE)]
    assert not bad, f"shoal.core must not import frontends or torch.nn/optim: {bad}"


def test_relative_imports_are_resolved_by_the_check():
    names = _imported_modules(SRC / "core" / "algorithms" / "__init__.py")  # `from .. import runtime`, ...
    assert "shoal.core.runtime" in names and "shoal.core.algorithms.flat" in names, names


#: shoal.tensorflow is built on shoal.keras (its bridge and collectives; shoal.tensorflow.keras IS shoal.keras),
#: and, as a marked workaround until they move to a module both frontends import, re-exports Horovod's
#: init and build queries from shoal.torch._api (in tensorflow/_api.py only).
_TF_MAY_IMPORT = {"tensorflow/_api.py": ("shoal.torch._api",)}


def test_frontends_import_the_engine_not_each_other():
    """Imports flow one way: shoal.torch and shoal.keras use shoal.core, never each other, shoal.tensorflow or
    shoal.parallel (the no-sync mark lives in core); shoal.tensorflow uses shoal.core and shoal.keras (see
    _TF_MAY_IMPORT); the optimizer wrappers and the tape leave negotiation, tuning and checks to the step
    owner (shoal.core.step)."""
    bad = []
    for frontend, others in (("torch", ("shoal.keras", "shoal.tensorflow", "shoal.parallel")),
                             ("keras", ("shoal.torch", "shoal.tensorflow", "shoal.parallel")),
                             ("tensorflow", ("shoal.torch", "shoal.parallel"))):
        for path in (SRC / frontend).rglob("*.py"):
            allowed = _TF_MAY_IMPORT.get(path.relative_to(SRC).as_posix(), ())
            bad += [f"{path.relative_to(SRC)}: {n}" for n in _imported_modules(path)
                    if n.startswith(others) and not n.startswith(allowed)]
    for rel in ("torch/optimizer.py", "keras/optimizer.py", "tensorflow/tape.py"):
        bad += [f"{rel}: {n}" for n in _imported_modules(SRC / rel)
                if n in ("shoal.core.negotiation", "shoal.core.autotune", "shoal.core.checks",
                         "shoal.core.reducer", "shoal.core.registration")]
    assert not bad, bad


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


def _module_all(tree: ast.Module) -> list[str] | None:
    """The names of a module-level ``__all__ = [...]`` (or tuple), or None when there is none."""
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                value = node.value
                if isinstance(value, (ast.List, ast.Tuple)) and all(
                        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
                    return [e.value for e in value.elts]
    return None


def test_every_module_has_all():
    """Every module assigns ``__all__`` at its top level, as a literal list of names (not a mention of the
    word in a comment), and every name in it exists in the module."""
    missing = []
    for path in SRC.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text())
        names = _module_all(tree)
        if names is None:
            missing.append(path.relative_to(SRC).as_posix())
    assert not missing, f"modules without a literal __all__: {missing}"


def test_public_names_exist_and_dir_is_all():
    """What dir() shows of the public packages is their __all__, and each name there resolves (no leaked
    helpers such as Any/Optional/log, no submodule shadowing a function of the same name)."""
    code = ("import importlib\n"
            "for name in ('shoal', 'shoal.torch', 'shoal.parallel'):\n"
            "    m = importlib.import_module(name)\n"
            "    shown = sorted(n for n in dir(m) if not n.startswith('__'))\n"
            "    public = sorted(n for n in m.__all__ if not n.startswith('__'))\n"
            "    assert shown == public, (name, sorted(set(shown) ^ set(public)))\n"
            "    for n in m.__all__:\n"
            "        v = getattr(m, n)\n"
            "        assert not (callable(v) and type(v).__name__ == 'module'), (name, n)\n"
            "import shoal.torch as hvd, types\n"
            "assert not isinstance(hvd.join, types.ModuleType) and not isinstance(hvd.broadcast, types.ModuleType)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
