"""`spl bench generate --world-size N`: run by torchrun over N real processes (gloo on CPU)."""

from __future__ import annotations

import json
import sys

import pytest
from cli_helpers import isolated_env, one_error_line, run_spl
from server_helpers import free_port


def test_world_size_without_torchrun_is_one_clear_line(tmp_path):
    result = run_spl(isolated_env(tmp_path), "bench", "generate", "--model", "random:default", "--world-size", "2")
    assert "torchrun --nproc-per-node 2" in one_error_line(result)


@pytest.mark.slow
def test_bench_on_two_ranks_reports_the_session(tmp_path):
    import subprocess

    env = isolated_env(tmp_path, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "superlinear.cli.main", "bench", "generate", "--model", "random:default", "--world-size", "2",
         "--lengths", "96", "--chunk-size", "40", "--decode-tokens", "2", "--json"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # one report: rank 0's
    assert report["world_size"] == 2
    superlinear, dense = report["rows"]
    assert superlinear["prefill_tok_s"] > 0 and superlinear["decode_eager_tok_s"] > 0
    assert superlinear["cache_bytes"] > 0
    assert dense["skipped"] == "one rank only"
