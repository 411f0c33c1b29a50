"""`spl models info` and `spl models check` answer from config.json and the safetensors headers:
no torch import (seconds on a small machine) where the headers say enough, and the same numbers
a load reports."""

from __future__ import annotations

import json
import subprocess
import sys

# Runs `spl ARGS` in a fresh interpreter: what it imported and how long the command took (the
# start-up every command shares, `spl --version` loading the plugins, left out)
PROBE = """
import contextlib, io, json, sys, time
from superlinear.cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--version"])
start = time.perf_counter()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        main(sys.argv[1:])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
print(json.dumps({"exit": code, "output": out.getvalue(), "seconds": time.perf_counter() - start,
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def probe(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_models_info_reads_headers_without_torch(tiny_llama):
    fast = probe("models", "info", str(tiny_llama), "--json")
    assert fast["exit"] == 0, fast["output"]
    assert not fast["torch"] and not fast["transformers"]
    assert fast["seconds"] < 1.0, fast  # the tiny llama: ~0.05 s (the default model ~0.2 s); a load took 10-30 s
    info = json.loads(fast["output"])
    assert info["loaded"] is False

    from superlinear.model import load_model

    loaded = load_model(str(tiny_llama), device="cpu").info()
    for key in ("name", "kind", "parameters", "bytes_on_disk", "attention", "kv_bytes_per_token",
                "recurrent_bytes_per_sequence", "layers", "layer_types", "vocab_size", "max_position_embeddings",
                "fingerprint", "dtype", "device"):
        assert info[key] == loaded[key], key


def test_models_check_refuses_a_plain_directory_without_torch(tmp_path):
    result = probe("models", "check", str(tmp_path))
    assert result["exit"] == 2 and not result["torch"], result
    assert f"no config.json in {tmp_path}" in result["output"]
