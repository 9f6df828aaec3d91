"""The core never imports the shell: no module of ``jaxmask/`` other than ``jaxmask/__init__.py``
(the lazy ``generate``/``load`` facade, see docs/architecture.md) imports ``ports``."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "jaxmask"


def _is_shell(module: str | None) -> bool:
    return module is not None and (module == "ports" or module.startswith("ports."))


def shell_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of ``ports`` in ``source``, anywhere (module level,
    inside functions or classes): ``import ports...``, ``from ports... import``, and
    ``importlib.import_module("ports...")`` / ``__import__("ports...")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_shell(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_shell(node.module):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and _is_shell(arg.value)
            ):
                found.append((node.lineno, arg.value))
    return found


def offenders(core: Path) -> list[str]:
    """``path:line: imports module`` for each shell import in a module of ``core`` (a package
    folder) other than its ``__init__.py``."""
    return [
        f"{path.relative_to(core.parent)}:{line}: imports {module}"
        for path in sorted(core.rglob("*.py"))
        if path != core / "__init__.py"
        for line, module in shell_imports(path.read_text(encoding="utf-8"))
    ]


def test_core_modules_do_not_import_the_shell():
    assert len(list(CORE.rglob("*.py"))) > 10, f"expected the core's modules under {CORE}"
    found = offenders(CORE)
    assert not found, "the core imports the shell (ports):\n" + "\n".join(found)


def test_catches_an_offending_module_in_a_package(tmp_path):
    core = tmp_path / "jaxmask"
    (core / "methods").mkdir(parents=True)
    (core / "__init__.py").write_text("import ports.api\n")  # the facade: allowed
    (core / "maps.py").write_text("import jax\n")
    (core / "methods" / "seediff.py").write_text("def f():\n    from ports import generate\n")
    assert offenders(core) == ["jaxmask/methods/seediff.py:2: imports ports"]


def test_the_facade_is_the_one_sanctioned_edge():
    # jaxmask/__init__.py imports ports (lazily); if it stops, offenders() need not skip it.
    assert shell_imports((CORE / "__init__.py").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "source, module",
    [
        ("import ports", "ports"),
        ("import numpy as np, ports.api as api", "ports.api"),
        ("from ports import api", "ports"),
        ("from ports.sd.load import load", "ports.sd.load"),
        ("def f():\n    from ports.generate import run\n    return run", "ports.generate"),
        ("class C:\n    def m(self):\n        import ports.cli", "ports.cli"),
        (
            "if True:\n    try:\n        import ports.store\n    except ImportError:\n        pass",
            "ports.store",
        ),
        ("import importlib\nimportlib.import_module('ports.api')", "ports.api"),
        ("__import__('ports')", "ports"),
    ],
)
def test_catches_an_offending_source(source, module):
    assert [m for _, m in shell_imports(source)] == [module]


@pytest.mark.parametrize(
    "source",
    [
        "import portsmouth",
        "from portsmouth import x",
        "from . import ports",  # a relative import: jaxmask's own submodule, not the shell
        "from .ports import x",
        "import jaxmask.ports_like",
        "x = 'import ports'",
        "# import ports",
    ],
)
def test_ignores_what_is_not_the_shell(source):
    assert shell_imports(source) == []
