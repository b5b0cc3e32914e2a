#!/usr/bin/env bash
# Download the Python wheels the prepared GPU run (bench/gpu/run_all.sh) needs and the GPU
# machine's image lacks, for its Python 3.12 on x86-64 Linux, into .whl/ (git-ignored; name it in
# the device tool's `carry`). The run installs them with
#   pip install --no-index --no-deps --target <dir> .whl/*.whl
# so every dependency is named here, each pinned, one version each:
#
#   torchao 0.18.0        ao_adamw8bit/ao_adamw4bit, the 32B fit's optimizer, CPUOffloadOptimizer
#   bitsandbytes 0.50.2   adamw8bit on CUDA: the CUDA default optimizer (8B step, offload checks,
#                         the tiny bf16-master training); its wheel carries libbitsandbytes_cuda130
#   datasets 5.2.0        the tokenization cache (fastmid train in the test subset)
#   dill 0.4.1, multiprocess 0.70.19   datasets' dependencies missing from the image (pyarrow,
#                         fsspec, xxhash, huggingface-hub, pandas, tqdm are there)
#
# Not needed: gguf (only for .gguf model files; the run builds random models from configs),
# flash-attn (not packaged as a wheel for this torch; the run says it is absent).
#
#   bash bench/gpu/fetch_wheels.sh [DEST]      # default DEST: <repo>/.whl
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DEST="${1:-$REPO/.whl}"
PY="${PYTHON:-python3}"
WHEELS=(torchao==0.18.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

mkdir -p "$DEST"
# one version of each package: an older wheel of the same name would stop the whole install
for spec in "${WHEELS[@]}"; do
    rm -f "$DEST/${spec%%==*}"-*.whl
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST" "${WHEELS[@]}"

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(cd "$REPO" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s + 0}')
ls -l "$DEST"/*.whl
echo "wheels: $((total / 1048576)) MiB; working tree: $((tree / 1048576)) MiB; together" \
    "$(((total + tree) / 1048576)) MiB of the device tool's 64 MiB"
if [ $((total + tree)) -gt $((62 * 1048576)) ]; then
    echo "fetch_wheels.sh: over 62 MiB together: the device tool would refuse the call" >&2
    exit 1
fi
