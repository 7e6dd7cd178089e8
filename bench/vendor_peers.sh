#!/usr/bin/env bash
# Liger-Kernel and Cut Cross-Entropy, unpacked into bench/.peers/ (git-ignored, ~9 MB), for a machine that has
# torch and triton but no network (a lent GPU): carry the folder there (the device tool's carry=["bench/.peers"])
# and every bench/bench_*.py finds the peers in it (bench/common.py puts it on sys.path, after what is installed).
# Pinned to the versions the CPU figures in README.md were measured with. TRL is not vendored: it needs datasets
# and pyarrow (~180 MB); where they are missing the e2e bench's TRL rows say "not installed".
#   bash bench/vendor_peers.sh [python]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${1:-python3}
rm -rf "$HERE/.peers"
"$PY" -m pip install -q --no-deps --target "$HERE/.peers" liger-kernel==0.8.5 cut-cross-entropy==25.1.1
du -sh "$HERE/.peers"
