"""Repository files one streamed chat request with a session runs code in, from the route to the
kernel and back (docs/architecture.md quotes the count). The app runs in process (starlette's
TestClient); after a warm-up request, every Python call on any thread is profiled during one
more request and the files under core/, plugins/ and cli/ are listed.

    python scripts/files_touched.py [--model default]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = tuple(str(REPO / name) + os.sep for name in ("core", "plugins", "cli"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="spl-files-touched-")
    os.environ.update(SPL_STATE_DIR=tmp + "/state", SUPERLINEAR_SNAPSHOT_DIR=tmp + "/snapshots")
    from starlette.testclient import TestClient

    from superlinear.plugins.serve import build_app
    from superlinear.settings.options import ServeOptions

    touched: set[str] = set()
    recording = threading.Event()

    def profile(frame, event, arg):
        if event == "call" and recording.is_set() and frame.f_code.co_filename.startswith(FOLDERS):
            touched.add(frame.f_code.co_filename)

    # Python 3.11 profiles only threads started after this: set it before the app's threads start.
    threading.setprofile(profile)
    sys.setprofile(profile)
    app = build_app(ServeOptions(model=args.model, max_seq_len=2048))

    body = {"messages": [{"role": "user", "content": "Say hello."}], "stream": True, "max_tokens": 8,
            "temperature": 0, "session_id": "measured"}
    with TestClient(app) as client:
        while client.get("/health").json().get("status") != "ok":
            time.sleep(0.2)
        client.post("/v1/chat/completions", json=body).read()  # warm-up: lazy imports, first allocations
        body["messages"] = [{"role": "user", "content": "And again."}]
        recording.set()
        response = client.post("/v1/chat/completions", json=body)
        recording.clear()
        assert response.status_code == 200 and "[DONE]" in response.text, response.text[-500:]
    for path in sorted(touched):
        print(os.path.relpath(path, REPO))
    print(f"{len(touched)} files")


if __name__ == "__main__":
    main()
