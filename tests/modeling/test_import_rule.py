"""The model is a closed room: every module under retina_focal/modeling imports, from this
package, only retina_focal.modeling itself, retina_focal.config (the keys, not the loader) and
retina_focal.utils; never the trainer, the data readers, evaluation, export or diagnostics."""
import ast
import os

import pytest

from tests.conftest import REPO

MODELING = os.path.join(REPO, "retina_focal", "modeling")
ALLOWED = ("retina_focal.modeling", "retina_focal.config.defaults", "retina_focal.utils.registry", "retina_focal.utils.comm")
ALLOWED_EXACT = ("retina_focal.config",)  # its __init__ imports defaults only (checked below)


def _modules():
    for root, _, files in os.walk(MODELING):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(root, name), REPO)


def _package_imports(path):
    """(line, module) of every import of retina_focal.* in ``path``, relative ones resolved."""
    package = os.path.dirname(path).replace(os.sep, ".")
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "retina_focal")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] == "retina_focal":
                yield node.lineno, base


def _allowed(module):
    return module in ALLOWED_EXACT or any(module == a or module.startswith(a + ".") for a in ALLOWED)


@pytest.mark.parametrize("path", list(_modules()))
def test_modeling_imports_only_itself_config_and_utils(path):
    bad = [f"{path}:{line} imports {module}" for line, module in _package_imports(path) if not _allowed(module)]
    assert not bad, "\n".join(bad)


def test_config_package_init_imports_the_keys_only():
    """retina_focal.config is allowed in modeling because its __init__ imports defaults.py only
    (load.py reads datasets)."""
    modules = {m for _, m in _package_imports(os.path.join("retina_focal", "config", "__init__.py"))}
    assert modules == {"retina_focal.config.defaults"}


def test_the_rule_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The walker sees relative and absolute imports alike (a test that can fail)."""
    fake = tmp_path / "retina_focal" / "modeling" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..data.checks import x\nimport retina_focal.engine.trainer\nfrom . import head\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", str(tmp_path))
    found = [m for _, m in _package_imports(os.path.join("retina_focal", "modeling", "bad.py"))]
    assert found == ["retina_focal.data.checks", "retina_focal.engine.trainer", "retina_focal.modeling"]
    assert [_allowed(m) for m in found] == [False, False, True]
