"""scripts/gpu_*.sh report failure: every step runs, and the script exits 1 when one failed
(scripts/gpu_common.sh), or at once when there is nothing to run on (no CUDA GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def bash(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source scripts/gpu_common.sh\n{script}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, OUT=str(tmp_path)))


def test_a_failed_step_fails_the_script_after_the_others_ran(tmp_path):
    result = bash("""
piped_failure() { false | tee /dev/null; }   # a test run piped into its log
step first true
step piped piped_failure
step after echo still-ran
step exit3 bash -c 'exit 3'
finish
echo not-reached
""", tmp_path)
    assert result.returncode == 1, result
    assert "still-ran" in result.stdout and "not-reached" not in result.stdout
    assert "FAILED: piped (exit 1)" in result.stderr and "FAILED: exit3 (exit 3)" in result.stderr
    assert "2 step(s) failed: piped (exit 1);exit3 (exit 3)" in result.stderr
    assert "first" not in result.stderr


def test_all_steps_passing_exits_zero(tmp_path):
    result = bash("step one true\nstep two echo fine\nfinish", tmp_path)
    assert result.returncode == 0 and "all steps passed" in result.stdout, result


def test_an_unknown_step_fails(tmp_path):
    result = bash('step bogus unknown_step bogus\nfinish', tmp_path)
    assert result.returncode == 1 and "unknown step: bogus" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_a_script_fails_at_once_without_a_gpu(tmp_path):
    """Without a GPU the GPU tests would all be skipped and pytest would exit 0: the script
    refuses before running anything."""
    env = dict(os.environ, OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "scripts/gpu_kernels.sh", "all"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 1, result
    assert "no CUDA GPU visible to torch" in result.stderr
    assert "===" not in result.stdout  # no step ran


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("gpu_*.sh")
                                          if p.name not in ("gpu_common.sh", "gpu_wheels.sh")))
def test_every_gpu_script_uses_the_common_steps(script):
    """Each script checks for the GPU before anything else and ends in ``finish`` (its exit
    status is its steps'), so a new one cannot go back to exiting 0 after a failure."""
    lines = [line.strip() for line in (ROOT / "scripts" / script).read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    start = lines.index("source scripts/gpu_common.sh")
    assert lines[start + 1] in ("require_gpu", "prepare_run") and lines[-1] == "finish"  # prepare_run checks first


# ---------------------------------------------------------------------------------------------
# the wheels a device call carries (scripts/gpu_wheels.sh)
# ---------------------------------------------------------------------------------------------

def bash_array(script: Path, name: str) -> list[str]:
    """The words of ``NAME=(...)`` in a bash script (one array, possibly over several lines)."""
    import re

    match = re.search(rf"^{name}=\((.*?)\)", script.read_text(), re.MULTILINE | re.DOTALL)
    assert match, f"{name}=(...) not found in {script}"
    return [word.strip("\"'").split("==")[0] for word in match.group(1).split()]


def normalized(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(roots, provided=frozenset()) -> set[str]:
    """The installed distributions ``roots`` need, their requirements included (no extras); a
    ``provided`` one is not looked into (another version, with its own requirements, is there)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [normalized(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in provided:
            continue
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalized(req.name))
    return seen


IMPORTED_ON_THE_DEVICE = r"""
import importlib, json, pathlib, pkgutil, sys
sys.path.insert(0, "tests")
import conftest, superlinear.cli.main, superlinear.plugins.serve, uvicorn
for info in pkgutil.iter_modules(superlinear.plugins.serve.__path__, "superlinear.plugins.serve."):
    importlib.import_module(info.name)
for path in sys.argv[1:]:
    importlib.import_module(pathlib.Path(path).stem)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


# imported when installed, not needed: torch.utils.data imports dill if it is there
OPTIONAL_IMPORTS = {"dill"}


def test_the_carried_wheels_hold_everything_the_gpu_tests_and_the_server_import():
    """Every distribution that the GPU test files and the server (``spl serve``: the serve plugin,
    uvicorn) import, and what those and the carried wheels require, is either in the device image
    (``IMAGE_PACKAGES``) or among the wheels ``scripts/gpu_wheels.sh`` downloads: fastapi needs opentelemetry-api, the
    openai client httpx2. A wheel left out fails a device call."""
    from importlib.metadata import packages_distributions

    script = ROOT / "scripts" / "gpu_wheels.sh"
    carried = {normalized(n) for n in bash_array(script, "MODEL_WHEELS") + bash_array(script, "SERVER_PACKAGES")}
    image = {normalized(n) for n in bash_array(script, "IMAGE_PACKAGES")}
    gpu_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text())
    done = subprocess.run([sys.executable, "-c", IMPORTED_ON_THE_DEVICE, *gpu_files], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    by_module = packages_distributions()
    imported = {normalized(dist) for module in json.loads(done.stdout.splitlines()[-1])
                for dist in by_module.get(module, [])}
    # what is imported, and every carried wheel's requirements (a carried package must work)
    needed = requirement_closure((imported | carried) - {"spl"} - OPTIONAL_IMPORTS, provided=image)
    assert "opentelemetry-api" in needed  # fastapi's: the check sees requirements, not only imports
    missing = sorted(needed - image - carried)
    assert missing == [], f"add to SERVER_PACKAGES in scripts/gpu_wheels.sh: {missing}"


def test_the_suite_orders_are_permutations_of_every_gpu_test_file(tmp_path):
    expected = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                      if "mark.gpu" in p.read_text() and p.name != "test_model_30b_gpu.py")
    orders = {}
    for order in ("normal", "reverse", "shuffle:1", "shuffle:2"):
        result = bash(f"gpu_test_files {order}", tmp_path)
        assert result.returncode == 0, result
        orders[order] = result.stdout.split()
    assert orders["normal"] == expected and orders["reverse"] == expected[::-1]
    assert sorted(orders["shuffle:1"]) == expected and orders["shuffle:1"] != orders["shuffle:2"]
    assert bash("gpu_test_files shuffle:1", tmp_path).stdout.split() == orders["shuffle:1"]  # seeded
    assert bash("gpu_test_files sideways", tmp_path).returncode == 2
