#!/usr/bin/env bash
# The generic (non-x86) build of the CPU kernels, checked on an x86-64 machine: cross-compiles
# the kernel sources and benchmarks/cpu_kernel_harness.cpp for aarch64 with the flags of
# cpu_ext/build.py's "generic" level, runs the harness under qemu-user, and prints its checksum
# beside an x86-64 build's for a few cases (the checksums should agree to the digits printed;
# the bits may differ where the vector code or FMA contraction differs). Timings under
# emulation mean nothing. Needs Debian's g++-aarch64-linux-gnu and qemu-user (installed with
# apt-get when missing and run as root). Usage: bash tools/check_aarch64.sh
set -euo pipefail
cd "$(dirname "$0")/.."
K=src/groupnorm/kernels/cpu_ext
OUT=${OUT_DIR:-$(mktemp -d)}
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
	apt-get install -y -qq g++-aarch64-linux-gnu qemu-user
fi
FLAGS="-O3 -std=c++20 -fno-math-errno -fno-trapping-math -fopenmp"
for f in gn_entry gn_nchw gn_nhwc bn; do
	aarch64-linux-gnu-g++ $FLAGS -fPIC -fvisibility=hidden -DGN_LEVEL='"generic"' -I$K \
		-c $K/$f.cpp -o "$OUT/$f.o" &
done
wait
aarch64-linux-gnu-g++ -shared -fopenmp "$OUT"/{gn_entry,gn_nchw,gn_nhwc,bn}.o -o "$OUT/libgnkernels-generic.so"
echo "exported: $(aarch64-linux-gnu-nm -D --defined-only "$OUT/libgnkernels-generic.so" | awk '$2 == "T" {print $3}' | xargs)"
aarch64-linux-gnu-g++ $FLAGS -I$K benchmarks/cpu_kernel_harness.cpp "$OUT"/{gn_entry,gn_nchw,gn_nhwc,bn}.o \
	-static -o "$OUT/harness-aarch64" 2>/dev/null
g++ $FLAGS -march=x86-64-v3 -I$K benchmarks/cpu_kernel_harness.cpp $K/{gn_entry,gn_nchw,gn_nhwc,bn}.cpp \
	-o "$OUT/harness-x86-64-v3"
# DTYPE ACT N C S G LAYOUT PASS (see the harness's header)
for args in "0 0 2 64 49 8 0 0" "0 1 2 64 49 8 1 0" "1 1 2 64 49 8 0 1" "2 0 8 128 16 128 0 0" "0 0 8 32 49 1 1 2"; do
	a=$(qemu-aarch64 "$OUT/harness-aarch64" $args 3 | sed 's/.*checksum/checksum/')
	x=$("$OUT/harness-x86-64-v3" $args 3 | sed 's/.*checksum/checksum/')
	echo "case $args: aarch64 $a | x86-64-v3 $x"
done
