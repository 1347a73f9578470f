"""The boundary and the packaging hold: a sans-IO core, a typed core, a
discoverable twistd plugin."""

from __future__ import annotations

import ast
import importlib.util
import site
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, List, Tuple

from twisted.trial import unittest

from tests.helpers import unavailable

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "firezone_relay" / "core"

#: Top-level modules the core must never import: I/O, clocks, randomness and
#: the Twisted world all belong to the adapters.
FORBIDDEN = frozenset(("twisted", "autobahn", "prometheus_client", "socket", "time", "random"))


def imported_modules(tree: ast.AST, package: str) -> Iterator[Tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``tree``, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from x import y` may import the module x.y
                yield node.lineno, "%s.%s" % (module, alias.name)


def forbidden_imports(source: str, package: str = "firezone_relay.core") -> List[Tuple[int, str]]:
    tree = ast.parse(source)
    return [
        (line, name)
        for line, name in imported_modules(tree, package)
        if name.split(".")[0] in FORBIDDEN
    ]


class CoreIsSansIOTests(unittest.SynchronousTestCase):
    def test_checker_catches_every_form(self) -> None:
        source = (
            "import time\n"
            "import os, socket as s\n"
            "from twisted.internet import reactor\n"
            "from random import Random\n"
            "def f():\n"
            "    import prometheus_client\n"
            "    from autobahn.twisted import websocket\n"
            "class C:\n"
            "    if True:\n"
            "        import time as t\n"
            "from . import stun\n"
            "import hashlib\n"
        )
        found = sorted({name.split(".")[0] for _, name in forbidden_imports(source)})
        self.assertEqual(found, ["autobahn", "prometheus_client", "random", "socket", "time", "twisted"])
        self.assertEqual(forbidden_imports("from . import stun\nimport hashlib\nfrom .auth import x\n"), [])

    def test_core_imports_no_io(self) -> None:
        files = sorted(CORE.glob("**/*.py"))
        self.assertTrue(files, "no core modules found under %s" % CORE)
        offences = []
        for path in files:
            rel = path.relative_to(ROOT)
            package = ".".join(rel.with_suffix("").parts[:-1])
            for line, name in forbidden_imports(path.read_text(encoding="utf-8"), package):
                offences.append("%s:%d imports %s" % (rel, line, name))
        self.assertEqual(offences, [], "the core must stay sans-IO (STYLE.md)")


class CoreTypesTests(unittest.TestCase):
    timeout = 300

    def test_mypy_strict(self) -> None:
        if importlib.util.find_spec("mypy") is None:
            unavailable(self, "mypy is not installed (pip install '.[test]')")
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "firezone_relay/core"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=280,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


def _site_dirs() -> List[Path]:
    dirs = set(site.getsitepackages() + [site.getusersitepackages()])
    for key in ("purelib", "platlib"):
        dirs.add(sysconfig.get_paths()[key])
    return [Path(d).resolve() for d in dirs]


class PluginTests(unittest.SynchronousTestCase):
    def test_no_init_in_twisted_plugins(self) -> None:
        # It would overwrite Twisted's own twisted/plugins/__init__.py on
        # install, and pip uninstall would then delete it.
        self.assertTrue((ROOT / "twisted" / "plugins" / "firezone_relay_plugin.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())

    def test_plugin_installed_and_discoverable(self) -> None:
        installed = [d for d in _site_dirs() if (d / "twisted" / "plugins" / "firezone_relay_plugin.py").exists()]
        if not installed:
            message = "firezone-relay is not installed in site-packages (pip install .)"
            unavailable(self, message)
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
        self.assertIn("firezone-relay", names)
        # `pip install .` compiled the batched UDP I/O extension (setup.py).
        built = [p for d in installed for p in (d / "firezone_relay" / "adapters").glob("_udpio*.so")]
        self.assertTrue(built, "pip install did not build firezone_relay.adapters._udpio")
