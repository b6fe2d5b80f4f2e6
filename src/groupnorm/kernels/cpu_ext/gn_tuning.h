// Tuning constants of the CPU kernels, in one place. Each says in one line why it has its
// value; the measurements behind them are in benchmarks/README.md (the table of approaches).
// Constants marked "(bits)" also fix the order in which sums are formed: changing one changes
// the results in their last bits, so compare such a change against the float64 reference, not
// by checksum.
#pragma once

#include <cstdint>

namespace gn_tuning {

using i64 = int64_t;

// float16 values converted per staged block: 8 KiB of float32 per buffer stays inside L1.
constexpr i64 kStage = 2048;
// (bits) values summed in float32 before the partial sum moves into double: short enough that
// float32 rounding stays a few ulps of the result, long enough to keep the loop vectorized.
constexpr i64 kRun = 2048;
// (bits) independent float32 accumulators of a long sum: enough vector registers (4 zmm, 8 ymm)
// for their adds to overlap instead of waiting on one dependent chain.
constexpr int kLanes = 64;
// float32 values per AVX-512 vector; short loops end with one overlapping block of this width
// instead of a scalar tail.
constexpr i64 kVec = 16;

// nchw: rows (channels) of up to this many values (7x7 to 16x16 maps) run the activation as one
// loop over the whole set instead of one short loop per channel, whose setup and partly empty
// last vector dominate at these sizes; longer rows lost with the extra pass.
constexpr i64 kShortRowMax = 256;
// nchw forward: sets of at most this many values (instance norm on small maps) take their
// statistics a block of kStatBlock sets at a time, so that the closing square root and division
// run as vector code over the block instead of one dependent scalar chain per set; a block of
// such sets (16 KiB of float32) is still in L1 for the output pass.
constexpr i64 kShortSetMax = 256;
constexpr int kStatBlock = 16;
// nchw short rows: values of the costly pass between two prefetches of the next set's data;
// short enough to keep the memory stalls overlapped, long enough for the loop to vectorize.
constexpr i64 kPrefetchChunk = 64;
// Tensors of at least this many bytes come from memory rather than cache, where fetching the
// next set ahead pays (nchw forward output pass, nchw backward first pass).
constexpr i64 kPrefetchTensorBytes = i64{4} << 20;
// nchw backward: the next set is prefetched only while a set is at most this many bytes; larger
// sets gained in some runs and lost in others.
constexpr i64 kPrefetchSetMaxBytes = i64{32} << 10;

// channels-last: channels whose sums are kept in registers (4 zmm each for two sums).
constexpr int kBlock = 64;
// (bits) channels-last: values per chunk of rows (each chunk is summed in float32, then
// combined in double); the chunk holds between these many rows. A function of the shape
// alone, so the thread count changes no bit.
constexpr i64 kChunkValues = i64{1} << 16;
constexpr i64 kChunkRowsMin = 16;
constexpr i64 kChunkRowsMax = 256;
// (bits) channels-last with one group: a sample is summed as a flat array in pieces of this
// many values (whole runs), so threads can share one sample.
constexpr i64 kPiece = i64{1} << 16;
// channels-last, one group, float16: the flat statistics only from this many values, where x
// comes from memory; below, staging the runs costs more than the per-channel sums.
constexpr i64 kFlatF16MinValues = i64{1} << 22;
// channels-last backward: dz (float32) is kept between the two passes up to this many values
// (8 MiB, which stays in cache); above, computing f'(z) again is cheaper than streaming it.
constexpr i64 kKeepDzMax = i64{1} << 21;

// batch norm, nchw: maps of at most this many values go through blocks of channels, because one
// channel's rows lie C * S values apart, strides the prefetcher does not follow.
constexpr i64 kBnShortRow = 256;
// batch norm, nchw: maps of kBnShortRow to 4 kBnShortRow values in tensors of at least this
// many bytes (from memory) are read as one sweep over the samples in memory order.
constexpr i64 kBnSweepBytes = i64{8} << 20;
// batch norm, float32 short rows: a block of channels fills about this many bytes (stays in L2
// between the statistics and the output pass), and holds at most kBnRowBlockCap channels.
constexpr i64 kBnRowBlockBytes = i64{256} << 10;
constexpr i64 kBnRowBlockCap = 64;
// batch norm: the largest block of channels of the sweep (its accumulators live on the stack).
constexpr i64 kBnRowBlockMax = 512;
// batch norm, bfloat16/float16 short rows: channels per block (at most, and at most kStage
// values a sample) and samples between two flushes of the float32 sums into double (bits).
constexpr i64 kBnBlock = 256;
constexpr i64 kBnFlush = 64;
// batch norm, rows layout: (bits) at most this many rows a chunk of the statistics, and at
// least this many chunks for the threads to share.
constexpr i64 kBnChunkRowsMax = 256;
constexpr i64 kBnMinChunks = 8;

// Below this many elements a second thread costs more to wake than it saves (torch's own grain
// size for its parallel loops is of the same order).
constexpr i64 kSerialBelow = i64{1} << 15;

static_assert(kRun == kStage, "float16 staging assumes runs of kStage values");
static_assert(kPiece % kRun == 0, "pieces are whole runs");

}  // namespace gn_tuning
