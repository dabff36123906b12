"""The package's shape: one `edgeswarm` namespace, a client that loads no server code, and no import that
bypasses the namespace. (The layers themselves are import-linter contracts: `lint-imports`.)"""

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("proto", "protocol", "model", "partition", "swarm", "agent", "node")
SERVER = "edgeswarm.node"


def _modules_loaded_by(statement: str) -> list[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(name for name in sys.modules if name.startswith('edgeswarm'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def test_the_public_api_is_the_edgeswarm_package():
    loaded = _modules_loaded_by("import edgeswarm; edgeswarm.SwarmClient, edgeswarm.SessionPolicy, edgeswarm.tool, edgeswarm.SwarmError")
    assert "edgeswarm.agent.client" in loaded and "edgeswarm.swarm.client" in loaded


def test_importing_the_client_loads_no_server_module():
    loaded = _modules_loaded_by("from edgeswarm import SwarmClient")
    assert [name for name in loaded if name == SERVER or name.startswith(SERVER + ".")] == []


def test_every_project_import_goes_through_the_namespace():
    bare = re.compile(rf"^\s*(from|import) ({'|'.join(LAYERS)})(\.|\s)", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in (*LAYERS, "tests", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if bare.search(path.read_text())
    ]
    assert offenders == []


def test_the_wheel_holds_only_the_edgeswarm_package(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "edgeswarm", source / "edgeswarm", symlinks=True)
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, source / layer, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(source)],
        check=True, timeout=300, capture_output=True,
    )
    [wheel] = tmp_path.glob("edgeswarm-*.whl")
    tops = {name.split("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"edgeswarm", next(top for top in tops if top.endswith(".dist-info"))}
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"edgeswarm/{layer}/__init__.py" for layer in LAYERS} <= set(names)
