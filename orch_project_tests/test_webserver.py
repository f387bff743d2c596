"""The real Dagster webserver loads the code location and shows the flow's assets, lineage and checks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orch_project.lib.settings import REPO_DIR

QUERY = """{ assetNodes { assetKey { path } dependencyKeys { path } groupName
  assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_webserver_serves_lineage_and_checks(orch_home, tmp_path):
    port = _free_port()
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen([str(exe), "-w", str(REPO_DIR / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
                            cwd=REPO_DIR, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        data = None
        while time.time() < deadline:
            try:
                data = _graphql(port, QUERY)
                if data.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert data and data["data"]["assetNodes"], f"webserver did not serve the code location: {data}"
        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
        deps = {"/".join(d["path"]) for d in nodes["support_drafts"]["dependencyKeys"]}
        assert deps == {"support_knowledge"}
        assert nodes["support_inbound"]["groupName"] == "support"
        checks = {c["name"]: c["blocking"] for c in nodes["support_inbound"]["assetChecksOrError"]["checks"]}
        assert checks == {"inbound_nothing_lost": True, "inbound_pii_masked": True}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
