"""Packaging: every package is listed, and a non-editable install works in a fresh venv.

The source folders core/, plugins/, cli/ are mapped to `superlinear`, `superlinear.plugins`
and `superlinear.cli`; the wheel must contain no top-level `core`, `cli` or `plugins`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "superlinear", "plugins": "superlinear.plugins", "cli": "superlinear.cli"}


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages without an __init__.py: {sorted(listed - found)}"


@pytest.mark.slow
def test_non_editable_install_into_fresh_venv(tmp_path):
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(wheel_dir.glob("spl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert not tops & {"core", "cli", "plugins", "tests"}, tops
    assert "superlinear" in tops
    assert "superlinear/model/shapes/superlinear-exp-30b.json" in names  # random:NAME shapes ship

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    with zipfile.ZipFile(wheel) as zf:  # what `pip install --no-deps` does for a pure wheel
        zf.extractall(site)
    # Dependencies come from the test environment, appended after the fresh site-packages.
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = (
        "import superlinear, sys\n"
        "from superlinear.cli.main import main\n"
        "print('FROM=' + superlinear.__file__)\n"
        "main(sys.argv[1:])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPL_LOAD_PLUGINS")}
    result = subprocess.run([str(py), "-c", script, "plugins"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"FROM={site}" in result.stdout, result.stdout
    for plugin in ("meta", "serve", "chat", "rag"):
        assert plugin in result.stdout


def test_constraints_pin_every_dependency_within_its_range():
    """A fresh machine installs exactly what CI tested: every dependency (and the test and eval
    extras) of pyproject.toml is pinned in constraints.txt, at a version its range admits."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    extras = project["optional-dependencies"]
    for spec in project["dependencies"] + extras["test"] + extras["eval"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
