"""Packaging: one version everywhere, and a pure-Python wheel that carries
every module and the ``py.typed`` markers.

The version lives in one place, ``kvstore/__init__.py`` (``__version__``);
``pyproject.toml`` reads it (``dynamic = ["version"]``), and ``kvstore
--version`` prints it.  The wheel and sdist are built here with ``python -m
build`` from a copy of the tree, so the checkout is left alone (offline, with
``--no-isolation``, where this venv has setuptools and wheel; the ``test``
extra does not bring wheel, so a fresh venv builds the isolated way).
``.ci/run`` also builds them, installs the wheel into a second fresh venv and
runs the quickstart from outside the tree.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import kvstore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("kvstore", "wal", "pages", "recovery")
RUNTIME_DEPENDENCIES = ("sortedcontainers", "crc32c", "lz4")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


# --- one version -------------------------------------------------------------------------


def test_version_is_a_pep440_release():
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", kvstore.__version__), kvstore.__version__


def test_pyproject_takes_the_version_from_kvstore():
    project = _pyproject()
    assert "version" not in project["project"], "the version must live only in kvstore/__init__.py"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kvstore.__version__"}


def test_command_line_version_is_the_package_version():
    out = subprocess.run([sys.executable, "-m", "kvstore", "--version"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == f"kvstore {kvstore.__version__}"
    script = os.path.join(os.path.dirname(sys.executable), "kvstore")
    if os.path.exists(script):  # the console script of the installed package
        out = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == f"kvstore {kvstore.__version__}"


def test_installed_metadata_has_the_package_version():
    try:
        installed = importlib.metadata.version("kvstore")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvstore is not installed (pip install -e '.[test]')")
    assert installed == kvstore.__version__, "stale install: run pip install -e '.[test]' again"


# --- the wheel and the sdist ------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, sdist) built from a copy of the source tree."""
    pytest.importorskip("build")
    base = tmp_path_factory.mktemp("packaging")
    src, out = base / "src", base / "dist"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv", "venv", ".ci", "*.egg-info", "__pycache__", "build", "dist", ".bench-tmp", ".hypothesis"),
    )
    # Offline with this venv's setuptools and wheel when it has them (the
    # project's `test` extra does not bring wheel); else the isolated way,
    # which installs them from the package index into a throwaway venv.
    offline = importlib.util.find_spec("wheel") and importlib.util.find_spec("setuptools")
    isolation = ["--no-isolation"] if offline else []
    r = subprocess.run(
        [sys.executable, "-m", "build", *isolation, "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    v = kvstore.__version__
    wheels = glob.glob(str(out / f"kvstore-{v}-*.whl"))
    sdists = glob.glob(str(out / f"kvstore-{v}.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(out)
    return wheels[0], sdists[0]


def test_wheel_is_pure_python(built):
    wheel, _ = built
    assert os.path.basename(wheel) == f"kvstore-{kvstore.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"kvstore-{kvstore.__version__}.dist-info/WHEEL").decode()
        names = z.namelist()
    assert "Root-Is-Purelib: true" in meta
    assert "Tag: py3-none-any" in meta
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))]


def test_wheel_carries_every_module_and_the_typed_markers(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    expected = {f"{p}/py.typed" for p in PACKAGES}
    for p in PACKAGES:
        expected |= {os.path.relpath(f, ROOT).replace(os.sep, "/") for f in glob.glob(os.path.join(ROOT, p, "*.py"))}
    assert expected - names == set()
    top = {n.split("/")[0] for n in names if not n.startswith("kvstore-")}
    assert top == set(PACKAGES), "only the four packages are installed (no tests/, bench/, examples/)"


def test_wheel_metadata_names_version_dependencies_and_the_command(built):
    wheel, _ = built
    info = f"kvstore-{kvstore.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert f"\nVersion: {kvstore.__version__}\n" in metadata
    assert "\nRequires-Python: >=3.10\n" in metadata
    required = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)(.*)$", metadata, re.M)
    plain = {name for name, rest in required if "extra ==" not in rest}
    assert plain == set(RUNTIME_DEPENDENCIES)
    assert re.search(r"^kvstore = kvstore\.cli:main$", entry_points, re.M)


def test_sdist_carries_the_readme_pyproject_and_typed_markers(built):
    _, sdist = built
    prefix = f"kvstore-{kvstore.__version__}/"
    with tarfile.open(sdist) as t:
        names = {n[len(prefix) :] for n in t.getnames() if n.startswith(prefix)}
    assert {"README.md", "pyproject.toml", "PKG-INFO"} <= names
    assert {f"{p}/py.typed" for p in PACKAGES} <= names
    assert {f"{p}/__init__.py" for p in PACKAGES} <= names
