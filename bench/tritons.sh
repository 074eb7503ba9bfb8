#!/usr/bin/env bash
# Every shipped kernel build under each Triton a user may have, no GPU needed:
# register allocation moves between Triton versions (a build spill-free under
# one spilled under another), and the GPU hosts run their torch's Triton, not
# the pinned one (torch 2.11 brings 3.6, the pinned 2.14 3.8; 3.9 is the newest).
#
#   bash bench/tritons.sh                  # 3.6.0 3.7.1 3.8.0 3.9.0, about 3 minutes on 2 cores
#   bash bench/tritons.sh 3.6.0 3.8.0      # some
#
# Each Triton is installed once beside the venv's (pip --target, under
# $TRITONS, default ~/.cache/make-dist/tritons) and put first on PYTHONPATH;
# bench/kernels.py --compile-only then builds every configuration for sm_80 and
# sm_90, and once more with 64-bit offsets. Records and the two tables land in
# $OUT (default /tmp/tritons); exits 1 if a build spills or overflows under any.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
sites=${TRITONS:-$HOME/.cache/make-dist/tritons}
out=${OUT:-/tmp/tritons}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.6.0 3.7.1 3.8.0 3.9.0)
mkdir -p "$out"
records=() records_64bit=()
for v in "${versions[@]}"; do
  site=$sites/$v
  if [ ! -d "$site/triton" ]; then
    echo "installing triton $v into $site"
    "$py" -m pip install -q --no-deps --target "$site.tmp" "triton==$v" && mv "$site.tmp" "$site"
  fi
  for mode in "" "--wide"; do
    name=triton-$v${mode:+-64bit}
    echo "== triton $v ${mode:+(64-bit offsets)}"
    env -u TRITON_INTERPRET PYTHONPATH="$site" TRITON_CACHE_DIR="$out/cache-$v" \
      "$py" bench/kernels.py --compile-only $mode --json "$out/$name.json" > "$out/$name.log"
  done
  records+=("$out/triton-$v.json") records_64bit+=("$out/triton-$v-64bit.json")
done
status=0
"$py" bench/kernels.py --compare "${records[@]}" --out "$out/builds.md" || status=1
"$py" bench/kernels.py --compare "${records_64bit[@]}" --out "$out/builds-64bit.md" || status=1
echo "tables: $out/builds.md, $out/builds-64bit.md"
exit $status
