"""Sessions that CI and a newcomer run: ``nox -s lint typecheck tests``.

Tests start the daemon, the supervisor and the applications as an ordinary
user, so the environment they run from must be readable and executable by
that user.  Two choices follow from that:

* the interpreter is Debian's ``/usr/bin/python3`` when it exists (a pyenv
  build under ``/root`` cannot be executed by ``nobody``);
* when nox runs as root, the virtual environments live under ``/opt/axnet``
  instead of ``.nox`` inside a checkout that may sit in a 0700 home.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
if os.geteuid() == 0:
    nox.options.envdir = "/opt/axnet/nox"

PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
HERE = Path(__file__).parent


def _install(session: nox.Session, *groups: str, project: bool = True) -> None:
    """Install the project (non-editable: other users must read it) and groups."""
    requirements: list[str] = []
    pyproject = nox.project.load_toml(HERE / "pyproject.toml")
    for group in groups:
        requirements += nox.project.dependency_groups(pyproject, group)
    if project:
        session.install("--quiet", "--upgrade", "--force-reinstall", "--no-deps", ".")
        session.install("--quiet", ".")
    if requirements:
        session.install("--quiet", *requirements)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit, property and end-to-end tests (namespace tests need root)."""
    _install(session, "test")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff, and the import-linter contracts that keep the pure cores pure."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the packages, the tests, the benchmarks and this file."""
    _install(session, "typecheck", "test")
    session.run("mypy")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: native and axnet side by side; writes bench/results/."""
    _install(session, "test")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """A local cluster showing what axnet does (``axnet demo``)."""
    _install(session)
    session.run("axnet", "demo", *session.posargs)
