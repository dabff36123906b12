#!/usr/bin/env bash
# Installs what is needed, starts a 3-node swarm on loopback with the embedded SmolLM2-135M-Instruct,
# answers a chat prompt through it (printing the answer and its route), then runs an agent task whose
# steps are scheduled on the nodes, and stops every node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m scripts.demo "$@"
