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
                                          if p.name != "gpu_common.sh"))
def test_every_gpu_script_uses_the_common_steps(script):
    """Each script checks for the GPU before anything else and ends in ``finish`` (its exit
    status is its steps'), so a new one cannot go back to exiting 0 after a failure."""
    lines = [line.strip() for line in (ROOT / "scripts" / script).read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    start = lines.index("source scripts/gpu_common.sh")
    assert lines[start + 1] in ("require_gpu", "prepare_run") and lines[-1] == "finish"  # prepare_run checks first
