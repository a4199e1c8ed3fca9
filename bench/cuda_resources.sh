#!/usr/bin/env bash
# Regenerates bench/cuda_resources.txt: registers, shared memory, stack and
# spills of every CUDA kernel for each configured architecture, as ptxas
# reports them (-Xptxas -v). Needs nvcc only, no GPU.
#   usage: bench/cuda_resources.sh [archs]   (default "90;100a", as ATLAS_CUDA_ARCHS)
set -euo pipefail
cd "$(dirname "$0")/.."
archs="${1:-90;100a}"
out=bench/cuda_resources.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
{
  echo "# ptxas resource usage of atlas's CUDA kernels (regenerate: bench/cuda_resources.sh)"
  echo "# nvcc ${nvcc_version}, -O3, archs: ${archs}"
  echo "# regs = registers per thread; smem = static shared memory per block (bytes; the"
  echo "# attention kernel adds dynamic shared memory at launch: see cuda/attention.cu);"
  echo "# stack / spill = local memory per thread (bytes)."
  printf "%-6s %-58s %5s %7s %6s %11s %10s\n" arch kernel regs smem stack spill_store spill_load
} > "$out"
demangle=c++filt
command -v cu++filt > /dev/null && demangle=cu++filt
IFS=';' read -ra arch_list <<< "$archs"
for arch in "${arch_list[@]}"; do
  for src in cuda/*.cu; do
    log="$tmp/$(basename "$src" .cu).$arch.log"
    nvcc -std=c++17 -O3 --expt-relaxed-constexpr -Icpp/include -Icuda \
      "-gencode=arch=compute_${arch},code=sm_${arch}" -Xptxas=-v -c "$src" -o "$tmp/obj.o" 2> "$log"
    # ptxas prints, per kernel: "Compiling entry function '<mangled>'", then
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads", then
    # "Used N registers, ... N bytes smem".
    awk -v arch="$arch" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ { stack = $1; spill_st = $5; spill_ld = $9 }
      /Used [0-9]+ registers/ {
        regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
        smem = 0; if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
        print arch "\t" name "\t" regs "\t" smem "\t" stack "\t" spill_st "\t" spill_ld
      }' "$log"
  done
done | while IFS=$'\t' read -r arch name regs smem stack sst sld; do
  pretty=$(echo "$name" | $demangle | sed -e 's/atlas::cuda::(anonymous namespace):://' -e 's/(.*//')
  printf "%-6s %-58s %5s %7s %6s %11s %10s\n" "$arch" "$pretty" "$regs" "$smem" "$stack" "$sst" "$sld"
done >> "$out"
echo "wrote $out"
if grep -E '^[^#].*verify_kernel' "$out" | awk '{ if ($(NF-1) != 0 || $NF != 0) bad = 1 } END { exit !bad }'; then
  echo "error: the verification kernel spills to local memory" >&2
  exit 1
fi
