"""A third-party plugin adds an HTTP route to the real server through `register_routes`."""

from __future__ import annotations

import os
import shutil

import httpx
from server_helpers import start_server
from test_plugins_thirdparty import write_dist

ROUTES_PLUGIN = '''
from superlinear.hookspecs import hookimpl


@hookimpl
def register_routes(register):
    from fastapi import APIRouter  # heavy imports stay inside the hook

    router = APIRouter()

    @router.get("/v1/hello")
    def hello(name: str = "world"):
        return {"hello": name}

    register(router)
'''


def test_plugin_route_is_served(tmp_path, monkeypatch, tiny_llama):
    write_dist(tmp_path, "spl-routes", "spl_routes", ROUTES_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("SPL_LOAD_PLUGINS", raising=False)
    server = start_server(api_key=None, extra_args=("--model", str(tiny_llama)))  # any model: the route is the point
    try:
        r = httpx.get(server.url + "/v1/hello", params={"name": "Ada"}, timeout=30)
        assert r.status_code == 200 and r.json() == {"hello": "Ada"}
        # the built-in routes are still there
        assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    finally:
        server.stop()
        shutil.rmtree(server.tmp, ignore_errors=True)
