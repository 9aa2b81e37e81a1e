// r1/cuda/fp8.cuh: Fp8Impl<Cuda>, FP8 E4M3 quantization and the block-scaled FP8 GEMM on
// Hopper (sm_90a; the instructions used exist from sm_89). The maths, shapes and scaling
// rules are r1/fp8.hpp's; these kernels reproduce its CPU reference:
//
//   quantize (1x128 tiles)     one warp per tile: amax by shuffles (max is order-free, so
//                              it is the CPU's bit for bit), codes by __nv_cvt_float_to_fp8
//                              with __NV_SATFINITE: round to nearest even, saturate at 448,
//                              as r1::fp8_e4m3. Same float operations (448 / amax, x * that,
//                              amax / 448; IEEE division, no fast math), so same bytes.
//   quantize (128x128 blocks)  one 256-thread block per weight block, same arithmetic.
//   GEMM                       y[BM x 128 tile] per thread block, 8 warps as 2 (M) x 4 (N),
//                              each warp (BM/2) x 32 of y. K advances one 128-wide scale block
//                              at a time through a double-buffered shared-memory pipeline
//                              (cp.async, zero-filled past M and N). Within a block the
//                              tensor cores multiply e4m3 x e4m3 with mma.sync m16n8k32 into
//                              fp32 registers (partial); after the block, every partial is
//                              promoted: total = fma(partial, a_scale[m,kb] * w_scale_inv[n/128,kb],
//                              total), the CPU's formula. The only difference from the CPU is the
//                              order (and the tensor cores' internal precision) of the sums
//                              inside a block: see tests/test_cuda_fp8.cu for the bound.
//
// Legend as in r1/fp8.hpp: M rows, N out_features, K in_features (a multiple of 128 here),
// KB = K/128. BM (64 or 128) rows of y per thread block: 64 when 128 would leave SMs idle.
#pragma once

#include "tensor.cuh"
#include "../fp8.hpp"

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace r1 {

namespace detail {

inline constexpr int kFp8Threads = 256;  // 8 warps, for every kernel here

__device__ __forceinline__ uint8_t fp8_encode(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// x[rows, cols] -> codes, scale[rows, col_tiles]: warp w of the grid takes tiles w, w + warps, ...
// (the loop bound depends on the warp only, so the shuffles see all 32 lanes). Lane l reads
// columns l, l+32, l+64, l+96 of its tile: coalesced.
__global__ void __launch_bounds__(kFp8Threads) fp8_quantize_tiles_kernel(const float* __restrict__ x,
                                                                         uint8_t* __restrict__ codes,
                                                                         float* __restrict__ scale, int64_t rows,
                                                                         int64_t cols, int64_t col_tiles) {
  constexpr int kWarpsPerBlock = kFp8Threads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t tiles = rows * col_tiles, warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; tile < tiles; tile += warps) {
    const int64_t row = tile / col_tiles, col_begin = (tile % col_tiles) * kFp8BlockSize;
    const float* x_row = x + row * cols;
    float values[4];
    float amax = kFp8AmaxFloor;
    for (int i = 0; i < 4; ++i) {
      const int64_t col = col_begin + lane + 32 * i;
      values[i] = col < cols ? x_row[col] : 0.0f;
      amax = fmaxf(amax, fabsf(values[i]));
    }
    amax = warp_max(amax);
    const float to_codes = 448.0f / amax;
    for (int i = 0; i < 4; ++i) {
      const int64_t col = col_begin + lane + 32 * i;
      if (col < cols) codes[row * cols + col] = fp8_encode(values[i] * to_codes);
    }
    if (lane == 0) scale[tile] = amax / 448.0f;
  }
}

// w[rows, cols] -> codes, scale_inv[gridDim.y, gridDim.x]: thread block (x, y) quantizes the
// 128x128 block at rows 128y.., cols 128x.., reading it twice (the second pass hits L2).
__global__ void __launch_bounds__(kFp8Threads) fp8_quantize_blocks_kernel(const float* __restrict__ w,
                                                                          uint8_t* __restrict__ codes,
                                                                          float* __restrict__ scale_inv, int64_t rows,
                                                                          int64_t cols) {
  constexpr int kBlock = static_cast<int>(kFp8BlockSize);
  __shared__ float warp_amax[kFp8Threads / 32];
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kBlock, col_begin = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int rows_here = static_cast<int>(rows - row_begin < kBlock ? rows - row_begin : kBlock);
  const int cols_here = static_cast<int>(cols - col_begin < kBlock ? cols - col_begin : kBlock);
  float amax = kFp8AmaxFloor;
  for (int i = threadIdx.x; i < kBlock * kBlock; i += kFp8Threads) {
    const int r = i / kBlock, c = i % kBlock;
    if (r < rows_here && c < cols_here) amax = fmaxf(amax, fabsf(w[(row_begin + r) * cols + col_begin + c]));
  }
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_amax[0];
  for (int i = 1; i < kFp8Threads / 32; ++i) amax = fmaxf(amax, warp_amax[i]);
  const float to_codes = 448.0f / amax;
  for (int i = threadIdx.x; i < kBlock * kBlock; i += kFp8Threads) {
    const int r = i / kBlock, c = i % kBlock;
    if (r < rows_here && c < cols_here) {
      const int64_t at = (row_begin + r) * cols + col_begin + c;
      codes[at] = fp8_encode(w[at] * to_codes);
    }
  }
  if (threadIdx.x == 0) scale_inv[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = amax / 448.0f;
}

// ---------------------------------------------------------------------------------------
// GEMM building blocks: PTX for sm_80+ (cp.async, ldmatrix) and sm_89+ (the e4m3 MMA).

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared without going through registers; src_bytes 0 reads
// nothing and zero-fills (rows past M or N).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Four 8x8 matrices of 16-bit elements (8 rows of 16 bytes each); lane l gives the row
// address of row l % 8 of matrix l / 8, and receives, from matrix j, register j holding
// bytes 4 (l % 4) .. 4 (l % 4) + 3 of row l / 4. For 8-bit data that is exactly the
// m16n8k32 fragment layout: row groupID, k = 4 threadID_in_group + 0..3.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// c[16x8] += a[16x32] b[32x8], e4m3 inputs, fp32 accumulators. With g = lane / 4 and
// t = lane % 4: a = {row g, row g+8} x {k 4t.., k 16+4t..} as (a0: g, lo) (a1: g+8, lo)
// (a2: g, hi) (a3: g+8, hi); b = column n = g, (b0: k lo) (b1: k hi); c = (c0, c1: row g,
// cols 2t, 2t+1) (c2, c3: row g+8). Only the pairing of a's and b's k slots matters for the
// sum, and both are filled from the same k offsets.
__device__ __forceinline__ void mma_e4m3_16x8x32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void store_output(float* y, float v) { *y = v; }
__device__ __forceinline__ void store_output(bf16* y, float v) {
  static_assert(sizeof(bf16) == sizeof(uint16_t));
  *reinterpret_cast<uint16_t*>(y) = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

struct Fp8GemmShape {
  static constexpr int kBlockN = 128;                 // = kFp8BlockSize: one w_scale_inv row per tile
  static constexpr int kBlockK = 128;                 // one scale block per pipeline stage
  static constexpr int kRowBytes = kBlockK + 16;      // padded shared rows: conflict-free ldmatrix
  static constexpr int kWarpsM = 2, kWarpsN = 4;      // 8 warps
  static constexpr int kWarpN = kBlockN / kWarpsN;    // 32 columns of y per warp
  static constexpr int kNTiles = kWarpN / 8;          // 4 n8 tiles per warp
  static constexpr int kChunksPerRow = kBlockK / 16;  // 16-byte cp.async chunks per tile row
  static_assert(kBlockN == kFp8BlockSize && kBlockK == kFp8BlockSize);
  static_assert(kWarpsM * kWarpsN * 32 == kFp8Threads);

  static constexpr int stage_bytes(int block_m) { return (block_m + kBlockN) * kRowBytes; }
  static constexpr int shared_bytes(int block_m) { return 2 * stage_bytes(block_m); }
};

// Copies rows [row0, row0 + tile_rows) x K-block kb of a row-major [rows, k] e4m3 matrix
// into a shared tile of kRowBytes-strided rows; rows past the end are zero-filled. Thread t
// copies 16-byte chunk t % 8 of rows t / 8, t / 8 + 32, ...
template <int tile_rows>
__device__ __forceinline__ void load_fp8_tile(uint32_t tile, const uint8_t* __restrict__ src, int64_t row0, int64_t rows,
                                              int64_t k, int64_t kb) {
  using S = Fp8GemmShape;
  constexpr int kRowsPerPass = kFp8Threads / S::kChunksPerRow;
  static_assert(tile_rows % kRowsPerPass == 0);
  const int first_row = threadIdx.x / S::kChunksPerRow, seg = threadIdx.x % S::kChunksPerRow;
#pragma unroll
  for (int pass = 0; pass < tile_rows / kRowsPerPass; ++pass) {
    const int r = first_row + pass * kRowsPerPass;
    const bool inside = row0 + r < rows;
    const uint8_t* from = src + (inside ? row0 + r : 0) * k + kb * S::kBlockK + seg * 16;
    cp_async_16(tile + r * S::kRowBytes + seg * 16, from, inside ? 16 : 0);
  }
}

// y[m0 : m0+BM, n0 : n0+128] for m0 = BM blockIdx.y, n0 = 128 blockIdx.x.
template <int BlockM, class Y>
__global__ void __launch_bounds__(kFp8Threads, 1)
    fp8_gemm_kernel(const uint8_t* __restrict__ a, const float* __restrict__ a_scale, const uint8_t* __restrict__ w,
                    const float* __restrict__ w_scale_inv, Y* __restrict__ y, int64_t m_rows, int64_t n_cols,
                    int64_t k_dim) {
  using S = Fp8GemmShape;
  constexpr int kWarpM = BlockM / S::kWarpsM;  // rows of y per warp
  constexpr int kMTiles = kWarpM / 16;         // m16 tiles per warp
  static_assert(kMTiles >= 1 && kWarpM % 16 == 0);
  extern __shared__ __align__(128) uint8_t fp8_gemm_shared[];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warp_m = warp / S::kWarpsN, warp_n = warp % S::kWarpsN;
  const int group = lane / 4, thread_in_group = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BlockM, n0 = static_cast<int64_t>(blockIdx.x) * S::kBlockN;
  const int m_valid = static_cast<int>(m_rows - m0 < BlockM ? m_rows - m0 : BlockM);  // rows of this tile inside y
  const int64_t k_blocks = k_dim / S::kBlockK;
  const float* w_scale_row = w_scale_inv + static_cast<int64_t>(blockIdx.x) * k_blocks;  // n0 / 128 = blockIdx.x
  const float* a_scale_tile = a_scale + m0 * k_blocks;

  const uint32_t shared_base = shared_address(fp8_gemm_shared);
  const auto a_tile = [&](int stage) { return shared_base + stage * S::stage_bytes(BlockM); };
  const auto w_tile = [&](int stage) { return a_tile(stage) + BlockM * S::kRowBytes; };
  const auto load_stage = [&](int stage, int64_t kb) {
    load_fp8_tile<BlockM>(a_tile(stage), a, m0, m_rows, k_dim, kb);
    load_fp8_tile<S::kBlockN>(w_tile(stage), w, n0, n_cols, k_dim, kb);
  };
  // ldmatrix row addresses (lane l gives row l % 8 of matrix l / 8). A's matrices 0..3 are
  // (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31) of an
  // m16 tile; W's are (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31)
  // of a pair of n8 tiles. Offsets within a stage; per tile and k32 step only constants add.
  const int matrix = lane / 8, matrix_row = lane % 8;
  const uint32_t a_lane_offset = (warp_m * kWarpM + (matrix % 2) * 8 + matrix_row) * S::kRowBytes + (matrix / 2) * 16;
  const uint32_t w_lane_offset = (warp_n * S::kWarpN + (matrix / 2) * 8 + matrix_row) * S::kRowBytes + (matrix % 2) * 16;
  // The rows of y this thread holds, within the tile: (mt, half) -> warp_m kWarpM + 16 mt + 8 half + group.
  const auto row_held = [&](int mt, int half) { return warp_m * kWarpM + mt * 16 + half * 8 + group; };

  float total[kMTiles][S::kNTiles][4] = {};
  load_stage(0, 0);
  cp_async_commit();
  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const int stage = static_cast<int>(kb % 2);
    if (kb + 1 < k_blocks) load_stage(stage ^ 1, kb + 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning stage kb
    cp_async_wait<1>();
    __syncthreads();

    // This block's scales, fetched before the MMAs so their latency hides behind them.
    const float w_scale = w_scale_row[kb];
    float row_scale[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_held(mt, half);
        row_scale[mt][half] = row < m_valid ? a_scale_tile[row * k_blocks + kb] : 0.0f;
      }

    float partial[kMTiles][S::kNTiles][4] = {};
    const uint32_t a_stage = a_tile(stage) + a_lane_offset, w_stage = w_tile(stage) + w_lane_offset;
    // Not unrolled: sm_90 has no native e4m3 mma.sync (ptxas converts the fragments to f16
    // for its MMAs; 242 registers for BM 64 against sm_89's 138), and unrolling these four
    // steps made ptxas spill the accumulators of BM 128.
#pragma unroll 1
    for (int ks = 0; ks < S::kBlockK / 32; ++ks) {
      uint32_t a_frag[kMTiles][4], w_frag[S::kNTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a_frag[mt], a_stage + mt * 16 * S::kRowBytes + ks * 32);
#pragma unroll
      for (int pair = 0; pair < S::kNTiles / 2; ++pair) {
        uint32_t r[4];
        ldmatrix_x4(r, w_stage + pair * 16 * S::kRowBytes + ks * 32);
        w_frag[2 * pair][0] = r[0];
        w_frag[2 * pair][1] = r[1];
        w_frag[2 * pair + 1][0] = r[2];
        w_frag[2 * pair + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < S::kNTiles; ++nt) mma_e4m3_16x8x32(partial[mt][nt], a_frag[mt], w_frag[nt]);
    }

    // Promotion into the fp32 totals, as the CPU reference: fma(partial, a_scale * w_scale, total).
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < S::kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float scale = row_scale[mt][e / 2] * w_scale;
          total[mt][nt][e] = __fmaf_rn(partial[mt][nt][e], scale, total[mt][nt][e]);
        }
    __syncthreads();  // everyone is done reading this stage before the next iteration refills it
  }

#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < S::kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row_held(mt, e / 2);
        const int64_t col = n0 + warp_n * S::kWarpN + nt * 8 + thread_in_group * 2 + e % 2;
        if (row < m_valid && col < n_cols) store_output(y + (m0 + row) * n_cols + col, total[mt][nt][e]);
      }
}

template <int BlockM, class Y>
void launch_fp8_gemm(const uint8_t* a, const float* a_scale, const uint8_t* w, const float* w_scale_inv, Y* y,
                     int64_t m_rows, int64_t n_cols, int64_t k_dim) {
  constexpr int shared = Fp8GemmShape::shared_bytes(BlockM);
  // Over the 48 KB default: opt in once per kernel (a failure throws and is retried next call).
  static const bool opted_in = [] {
    R1_CUDA_CHECK(cudaFuncSetAttribute(fp8_gemm_kernel<BlockM, Y>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared),
                  "fp8.gemm");
    return true;
  }();
  (void)opted_in;
  const int64_t m_tiles = (m_rows + BlockM - 1) / BlockM, n_tiles = (n_cols + Fp8GemmShape::kBlockN - 1) / Fp8GemmShape::kBlockN;
  R1_CHECK(m_tiles <= 65535, "[fp8.gemm] M = ", m_rows, " needs ", m_tiles, " row tiles, more than a grid's 65535");
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles));
  fp8_gemm_kernel<BlockM, Y><<<grid, kFp8Threads, shared, cuda_stream()>>>(a, a_scale, w, w_scale_inv, y, m_rows, n_cols, k_dim);
  R1_CUDA_CHECK_LAUNCH("fp8.gemm");
}

inline const uint8_t* fp8_bytes(const fp8_e4m3* p) { return reinterpret_cast<const uint8_t*>(p); }
inline uint8_t* fp8_bytes(fp8_e4m3* p) { return reinterpret_cast<uint8_t*>(p); }

}  // namespace detail

template <>
struct Fp8Impl<Cuda> {
  static void quantize(ConstView<float, Cuda> x, MutableView<fp8_e4m3, Cuda> codes, MutableView<float, Cuda> scale,
                       int64_t tile_rows) {
    static_assert(sizeof(fp8_e4m3) == 1, "codes are written as bytes");
    const int64_t rows = x.size(0), cols = x.size(1);
    if (tile_rows == 1) {
      const int64_t tiles = scale.numel();
      detail::fp8_quantize_tiles_kernel<<<cuda_blocks(tiles, detail::kFp8Threads / 32), detail::kFp8Threads, 0,
                                          cuda_stream()>>>(x.data(), detail::fp8_bytes(codes.data()), scale.data(), rows,
                                                           cols, scale.size(1));
      R1_CUDA_CHECK_LAUNCH("fp8.quantize_tiles");
    } else {
      R1_CHECK(scale.size(0) <= 65535, "[fp8.quantize_blocks] ", rows, " rows make ", scale.size(0),
               " row blocks, more than a grid's 65535");
      const dim3 grid(static_cast<unsigned>(scale.size(1)), static_cast<unsigned>(scale.size(0)));
      detail::fp8_quantize_blocks_kernel<<<grid, detail::kFp8Threads, 0, cuda_stream()>>>(
          x.data(), detail::fp8_bytes(codes.data()), scale.data(), rows, cols);
      R1_CUDA_CHECK_LAUNCH("fp8.quantize_blocks");
    }
  }

  template <class Y>
  static void gemm(ConstView<fp8_e4m3, Cuda> a, ConstView<float, Cuda> a_scale, ConstView<fp8_e4m3, Cuda> w,
                   ConstView<float, Cuda> w_scale_inv, MutableView<Y, Cuda> y) {
    const int64_t m_rows = a.size(0), k_dim = a.size(1), n_cols = w.size(0);
    R1_CHECK(k_dim > 0 && k_dim % kFp8BlockSize == 0, "[fp8.gemm] K = ", k_dim,
             " must be a positive multiple of 128 on CUDA (whole scale blocks)");
    // cp.async moves 16-byte chunks: rows are (K a multiple of 128), the bases must be too.
    R1_CHECK(reinterpret_cast<uintptr_t>(a.data()) % 16 == 0 && reinterpret_cast<uintptr_t>(w.data()) % 16 == 0,
             "[fp8.gemm] a and w must start on 16-byte boundaries");
    int device = 0, sms = 0;
    R1_CUDA_CHECK(cudaGetDevice(&device), "fp8.gemm");
    R1_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "fp8.gemm");
    // 128-row tiles unless they would leave SMs idle that 64-row tiles would use.
    constexpr int64_t block_n = detail::Fp8GemmShape::kBlockN;
    const int64_t n_tiles = (n_cols + block_n - 1) / block_n;
    const bool small = m_rows <= 64 || ((m_rows + 127) / 128) * n_tiles < sms;
    const uint8_t* a_bytes = detail::fp8_bytes(a.data());
    const uint8_t* w_bytes = detail::fp8_bytes(w.data());
    if (small) {
      detail::launch_fp8_gemm<64>(a_bytes, a_scale.data(), w_bytes, w_scale_inv.data(), y.data(), m_rows, n_cols, k_dim);
    } else {
      detail::launch_fp8_gemm<128>(a_bytes, a_scale.data(), w_bytes, w_scale_inv.data(), y.data(), m_rows, n_cols, k_dim);
    }
  }
};

}  // namespace r1
