#!/usr/bin/env bash
# Idempotently build /work/main/.petals-venv: a separate venv with PyPI `petals` 2.2.0.post1 for the
# Petals half of scripts/bench_serving.py (run scripts/petals_worker.py with .petals-venv/bin/python).
#
# Why this is more than `pip install petals`:
#   * petals 2.2.0.post1 pins hivemind==1.1.10.post2, which exists on PyPI only as an sdist whose
#     setup.py (a) imports pkg_resources (gone from setuptools>=70/80) and (b) downloads the Go
#     p2pd binary from GitHub at build time (unreachable here). We build that sdist ourselves with
#     setuptools>=77.0.3,<81 and no build isolation, after putting in a p2pd binary taken from the PyPI
#     wheel of hivemind 1.1.12 (same p2pd.proto control protocol, superset of the CLI flags that
#     1.1.10 passes) and pointing setup.py's checksum at it (done here by sed, reproducibly).
#   * torch is pinned to the local CPU build 2.13.0 (a plain `torch` would pull a multi-GB CUDA
#     build); everything else is pinned to the era petals 2.2 was released in (see CONSTRAINTS).
# A stamp file makes a second run instant. Set PETALS_ENV_FORCE=1 to rebuild.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PETALS_VENV:-$ROOT/.petals-venv}"
STAMP="$VENV/.petals-env-stamp-v1"
PY="${PYTHON:-python3}"

if [[ -f "$STAMP" && "${PETALS_ENV_FORCE:-0}" != "1" ]]; then
    exit 0
fi

rm -rf "$VENV"
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

CONSTRAINTS="$VENV/petals-constraints.txt"
cat > "$CONSTRAINTS" <<'EOF'
torch==2.13.0
setuptools>=77.0.3,<81
numpy<2
pydantic<2
protobuf>=3.20,<5
grpcio-tools<1.63
grpcio<1.63
transformers==4.34.1
tokenizers<0.15,>=0.14
huggingface-hub<0.26
accelerate==0.27.2
peft==0.5.0
safetensors<0.5
multiaddr==0.0.9
scipy<1.14
EOF
export PIP_CONSTRAINT="$CONSTRAINTS"   # also applies inside any pip build subprocess

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# 1. build prerequisites for the hivemind sdist (no build isolation, so these are what it sees)
"${PIP[@]}" install -q "setuptools>=77.0.3,<81" wheel "grpcio-tools<1.63" "protobuf<5" "torch==2.13.0" "numpy<2"

# 2. p2pd binary: from the PyPI wheel of hivemind 1.1.12 (hivemind 1.1.10.post2 would download it from GitHub)
"${PIP[@]}" download -q --no-deps --only-binary :all: "hivemind==1.1.12" -d "$WORK/w"
P2PD_WHL="$(ls "$WORK"/w/hivemind-1.1.12-*.whl | head -n1)"
"$VPY" - "$P2PD_WHL" "$WORK/p2pd" <<'EOF'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("hivemind/hivemind_cli/p2pd"))
os.chmod(sys.argv[2], 0o755)
EOF

# 3. hivemind 1.1.10.post2 from its sdist, checksum re-pointed at the p2pd above
"${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation "hivemind==1.1.10.post2" -d "$WORK/s"
tar -xzf "$WORK"/s/hivemind-1.1.10.post2.tar.gz -C "$WORK"
HM="$WORK/hivemind-1.1.10.post2"
cp "$WORK/p2pd" "$HM/hivemind/hivemind_cli/p2pd"
SHA="$(sha256sum "$WORK/p2pd" | cut -d' ' -f1)"
sed -i -E "s/(\"p2pd-linux-amd64\": \")[0-9a-f]+\"/\1$SHA\"/; s/(\"p2pd-linux-arm64\": \")[0-9a-f]+\"/\1$SHA\"/" "$HM/setup.py"
"${PIP[@]}" install -q --no-build-isolation "$HM"

# 4. petals itself (hivemind==1.1.10.post2 is already satisfied)
"${PIP[@]}" install -q "petals==2.2.0.post1" "torch==2.13.0"

# import check, with the runtime shims the worker applies (hivemind 1.1.10 vs torch 2.13)
"$VPY" "$ROOT/scripts/petals_worker.py" --versions
"${PIP[@]}" freeze > "$VENV/petals-freeze.txt"
touch "$STAMP"
