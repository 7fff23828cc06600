"""The public surface of axnet is what we think it is."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest

import axnet
import axnet._cli
import axnet.testing
import swim

TESTING_EXPORTS = {
    "APPS",
    "AXNET",
    "AxnetNode",
    "CLUSTER_SUBNET",
    "Cluster",
    "HostError",
    "Leftovers",
    "NetnsHost",
    "TestUser",
    "become_subreaper",
    "can_make_netns",
    "can_run_as_nobody",
    "cleanup_stale",
    "cpu_ns",
    "find_leftovers",
    "gossip_daemon_args",
    "has_program",
    "make_hosts",
    "make_runtime_dir",
    "reap_zombie_children",
    "remove_leftovers",
    "shared_tmp",
    "stop_process",
    "unprivileged",
    "wait_until",
}


def _public(package: types.ModuleType) -> set[str]:
    """Public names, leaving out submodules that other imports happened to load."""
    return {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }


def _reexports(package: types.ModuleType) -> list[tuple[str, str]]:
    """(module, name) of every ``from .x import Name as Name`` in the package's __init__."""
    assert package.__file__ is not None
    tree = ast.parse(Path(package.__file__).read_text())
    found: list[tuple[str, str]] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                assert alias.asname == alias.name, (
                    f"{package.__name__} imports {alias.name} as {alias.asname}: "
                    "re-export as 'Name as Name'"
                )
                found.append((f"{package.__name__}.{node.module}", alias.name))
    return found


def test_version() -> None:
    assert isinstance(axnet.__version__, str)
    assert axnet.__version__ == importlib.metadata.version("axnet")


def test_axnet_top_level_exports_nothing_else_yet() -> None:
    assert _public(axnet) == set()


def test_testing_exports() -> None:
    assert _public(axnet.testing) == TESTING_EXPORTS


REPO = Path(axnet.__file__).parent.parent
SWIM_SHADOWED = swim.__file__ is None  # see test_tests_swim_does_not_shadow_the_swim_package


@pytest.mark.parametrize("package", [axnet, axnet.testing, swim], ids=lambda p: p.__name__)
def test_reexports_are_the_private_modules_objects(package: types.ModuleType) -> None:
    if package is swim and SWIM_SHADOWED:
        pytest.skip("'import swim' found tests/swim (a namespace package), not the package")
    reexports = _reexports(package)
    assert reexports
    for module, name in reexports:
        assert getattr(package, name) is getattr(importlib.import_module(module), name)
    # Every public name comes from a re-export, none is defined in __init__.
    assert _public(package) == {name for _, name in reexports} - {"__version__"}


def test_console_script_entry_point() -> None:
    (entry,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "axnet"
    ]
    assert entry.value == "axnet._entry:main"
    assert entry.load() is axnet._entry.main


def test_python_dash_m_axnet_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "axnet", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: axnet")


def test_tests_swim_does_not_shadow_the_swim_package(tmp_path: Path) -> None:
    # What pytest's default import mode does: put the conftest's directory,
    # tests/, first on sys.path.  The editable install's finder comes after.
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import swim; print(swim.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe, str(REPO / "tests")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == str(REPO / "swim" / "__init__.py")
