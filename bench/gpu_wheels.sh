#!/usr/bin/env bash
# Downloads, HERE (pip reaches the registry; the device machine reaches nothing), the wheels of the peers that the
# device image lacks into .whl/, for `bash bench/run_gpu.sh e2e|peers` with carry=[".whl"]. Also writes
# .whl/GIT_COMMIT (HEAD, +dirty when tracked files changed): the device's copy of the tree may have no .git.
# usage: bash bench/gpu_wheels.sh [NAME==VERSION ...]   (default: the pins below)
#
# The image (Python 3.12, torch 2.11+cu130, triton 3.6, transformers 5.17, accelerate, pandas, pyarrow, xxhash,
# fsspec, huggingface-hub, ...; /work/.library/device/KINDS.md lists it) has none of liger-kernel,
# cut-cross-entropy, trl, nor trl's datasets and datasets' dill and multiprocess. All are pure Python (~3 MB in
# all), installed there with --no-deps into a folder of the work copy. Keep one version of each: two stop the
# whole install. .whl/ is git-ignored (.gitignore); never commit the wheels.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DEFAULT=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
if [ $# -gt 0 ]; then PKGS=("$@"); else PKGS=("${DEFAULT[@]}"); fi
PY=${PYTHON:-python3}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '.whl/' .gitignore || echo '/.whl/' >>"$(git rev-parse --git-path info/exclude)"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PKGS[@]}"
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit+dirty"
echo "$commit" >.whl/GIT_COMMIT
ls -la .whl
size=$(du -sk .whl | cut -f1)
echo "total ${size} KiB in .whl/ (the working tree that travels may hold 64 MiB); commit $commit"
if [ "$size" -gt 32768 ]; then echo "WARNING: .whl/ is over 32 MiB: the call may exceed the 64 MiB limit" >&2; fi
