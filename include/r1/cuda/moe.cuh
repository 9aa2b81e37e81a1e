// r1/cuda/moe.cuh: DeepSeekMoE on the GPU: MoeImpl<Cuda>, MoeCache<T, Cuda> and the grouped
// GEMMs the experts run through.
//
//   routing:   one warp per token: s = sigmoid(l) or softmax(l) from fp32 logits, the
//              selection scores c = s + b in double (as the host path, so ties and
//              near-ties break identically), group scores (sum of the top-2 c, or max s),
//              top-k groups then top-k experts by k rounds of a warp argmax in the order
//              "larger first, lower index on ties", weights from the unbiased s.
//   dispatch:  counting sort of the N*k (token, slot) pairs by expert: per-chunk histograms,
//              one block scans them into per-expert offsets and per-chunk bases, then one
//              warp per chunk scatters in flat (token, slot) order with __match_any_sync, so
//              the order within an expert is the host's. No atomics on global memory.
//   experts:   a = X_e W1_e^T, b = X_e W3_e^T, h = silu(a) * b, Y_e = h W2_e^T over the
//              contiguous sorted rows; each projection is ONE grouped GEMM for all experts:
//              a block maps its linear tile index to (expert, row tile) by a binary search
//              over per-expert tile offsets computed on the device, so nothing syncs with
//              the host per expert.
//   combine:   y[n] = shared(x)[n] + sum_j w[n,j] Y[slot(n,j)], one block per token, in j
//              order (deterministic).
//   backward:  dY = w dy, dw = dy . Y; dH = dY W2_e, dW2_e += dY_e^T h_e; dgate/dup through
//              SwiGLU; dX = dgate W1_e + dup W3_e, dW1_e += dgate_e^T X_e (and W3); dx sums
//              each token's dX rows in slot order; the gate through the weights, their
//              normalization, the balance loss and sigmoid/softmax, as the host path.
//
// Grouped GEMMs (one launch each, experts' row ranges read on the device):
//   RowsNT: C[rows_g] = A[rows_g] B_g^T   (B_g [N, K], a Linear weight)      forward
//   RowsNN: C[rows_g] = A[rows_g] B_g     (B_g [K, N])                       backward to x
//   SumTN:  C_g += A[rows_g]^T B[rows_g]  (reduction over group g's rows)    backward to W
// bf16 inputs run on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulation, 64x64 tiles);
// anything else (float, or the fp32 gate logits against bf16 weights) on a fp32 SIMT tiled
// kernel. Every output element is owned by one block and summed in a fixed order, so the
// results are deterministic run to run.
//
// T is float or r1::bf16. Routing scores, logits and weights are fp32 for both; for bf16
// the activations, expert outputs and gradients are bf16 with fp32 accumulation.
//
// Legend: N tokens, D dim, E routed experts, k experts per token, G groups, H hidden
// (moe_intermediate_size), S = N*k sorted slots.
#pragma once

#include "tensor.cuh"
#include "../moe.hpp"

#include <cuda_bf16.h>
#include <mma.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace r1 {

namespace moe_kernels {

static_assert(sizeof(bf16) == sizeof(__nv_bfloat16), "r1::bf16 must have __nv_bfloat16's layout");

// r1's element types as the device sees them.
template <class T>
struct DeviceElement {
  using type = T;
};
template <>
struct DeviceElement<bf16> {
  using type = __nv_bfloat16;
};
template <class T>
using device_t = typename DeviceElement<T>::type;

template <class T>
device_t<T>* dev(T* p) {
  return reinterpret_cast<device_t<T>*>(p);
}
template <class T>
const device_t<T>* dev(const T* p) {
  return reinterpret_cast<const device_t<T>*>(p);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return __float2bfloat16(v);  // round to nearest even, as r1::bf16
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

constexpr int kWarp = 32;
constexpr int kRowTile = 64;        // rows of C per GEMM block: the grouped tile offsets use it
constexpr int kColTile = 64;        // columns of C per GEMM block
constexpr int kSortChunk = 1024;    // slots per histogram / scatter chunk
constexpr int kScanThreads = 1024;  // the one-block scans
constexpr int kSmemBytes = 48 * 1024;

// ---------------------------------------------------------------------------------------
// Warp and block helpers.
template <class V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int d = kWarp / 2; d > 0; d /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

// out[i] = value(0) + ... + value(i - 1) for i in [0, n], out[n] the total; called by every
// thread of one block whose size is a multiple of 32.
template <class Out, class Value>
__device__ void block_exclusive_scan(int64_t n, Value value, Out* out) {
  __shared__ Out warp_totals[kWarp];
  __shared__ Out carry;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const Out v = i < n ? value(i) : Out(0);
    Out inclusive = v;
    for (int d = 1; d < kWarp; d *= 2) {
      const Out up = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += up;
    }
    if (lane == kWarp - 1) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      Out total = lane < warps ? warp_totals[lane] : Out(0);
      for (int d = 1; d < kWarp; d *= 2) {
        const Out up = __shfl_up_sync(0xffffffffu, total, d);
        if (lane >= d) total += up;
      }
      if (lane < warps) warp_totals[lane] = total;
    }
    __syncthreads();
    const Out before = carry + (warp > 0 ? warp_totals[warp - 1] : Out(0)) + inclusive - v;
    if (i < n) out[i] = before;
    __syncthreads();  // carry and warp_totals are read; the last thread moves carry on
    if (threadIdx.x == blockDim.x - 1) carry = before + v;
    __syncthreads();
  }
  if (threadIdx.x == 0) out[n] = carry;
}

// ---------------------------------------------------------------------------------------
// Tiled GEMMs. Every operand is a row-major matrix; tiles are staged in shared memory in
// their global orientation, and the kernels read A(m, k) and B(k, n) accordingly.
enum class GemmKind { RowsNT, RowsNN, SumTN };

template <class TA, class TB, class TC>
struct GemmProblem {
  const TA* a = nullptr;            // RowsNT/RowsNN: [m, k];  SumTN: [k, m]
  int64_t lda = 0;
  const TB* b = nullptr;            // RowsNT: [n, k];  RowsNN and SumTN: [k, n]
  const uintptr_t* b_table = nullptr;  // per group B (Rows kinds) instead of b
  int64_t ldb = 0;
  TC* c = nullptr;                  // [m, n]
  const uintptr_t* c_table = nullptr;  // per group C (SumTN) instead of c
  int64_t ldc = 0;
  int64_t m = 0, n = 0, k = 0;
  int64_t groups = 1;
  const int64_t* group_offset = nullptr;  // [groups + 1] over m (Rows kinds) or k (SumTN); null: one group
  const int32_t* tile_offset = nullptr;   // [groups + 1] row tiles before each group (Rows kinds)
  bool accumulate = false;                // C += instead of C =
  bool a_vector = false, b_vector = false;  // 16-byte loads are aligned
};

// The part of the problem one block owns.
struct GemmTile {
  int64_t group = 0, m0 = 0, m_end = 0, k_begin = 0, k_end = 0;
};

// Maps blockIdx to its tile; false when the block has nothing to do.
template <GemmKind Kind, class P>
__device__ __forceinline__ bool locate_tile(const P& p, GemmTile& t) {
  if constexpr (Kind == GemmKind::SumTN) {
    t.group = blockIdx.z;
    t.m0 = static_cast<int64_t>(blockIdx.x) * kRowTile;
    t.m_end = p.m;
    t.k_begin = p.group_offset ? p.group_offset[t.group] : 0;
    t.k_end = p.group_offset ? p.group_offset[t.group + 1] : p.k;
    return t.k_begin < t.k_end || !p.accumulate;  // an idle group adds nothing
  } else {
    const int64_t tile = blockIdx.x;
    t.k_begin = 0;
    t.k_end = p.k;
    if (!p.group_offset) {
      t.m0 = tile * kRowTile;
      t.m_end = p.m;
      return t.m0 < p.m;
    }
    if (tile >= p.tile_offset[p.groups]) return false;  // the grid is an upper bound
    int64_t lo = 0, hi = p.groups - 1;                  // the last group starting at or before tile
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (p.tile_offset[mid] <= tile) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    t.group = lo;
    t.m0 = p.group_offset[lo] + (tile - p.tile_offset[lo]) * kRowTile;
    t.m_end = p.group_offset[lo + 1];
    return true;
  }
}

// Copies rows [row0, row0 + R) x cols [col0, col0 + C) of a row-major global matrix into
// smem[R][Ld], zeros where row >= row_end or col >= col_end. 16-byte loads where a chunk lies
// whole inside and vector_ok (src 16-byte aligned, ld and col0 multiples of the chunk).
template <int R, int C, int Ld, int Threads, class S, class G>
__device__ __forceinline__ void load_tile(S* smem, const G* src, int64_t ld, int64_t row0, int64_t row_end, int64_t col0,
                                          int64_t col_end, bool vector_ok) {
  constexpr int V = 16 / static_cast<int>(sizeof(G));
  static_assert(C % V == 0, "tile width must hold whole 16-byte chunks");
  constexpr int chunks_per_row = C / V;
  for (int i = threadIdx.x; i < R * chunks_per_row; i += Threads) {
    const int r = i / chunks_per_row, cc = (i % chunks_per_row) * V;
    const int64_t row = row0 + r, col = col0 + cc;
    S* dst = smem + r * Ld + cc;
    if (vector_ok && row < row_end && col + V <= col_end) {
      const uint4 packed = *reinterpret_cast<const uint4*>(src + row * ld + col);
      if constexpr (std::is_same_v<S, G> && Ld % V == 0) {
        *reinterpret_cast<uint4*>(dst) = packed;
      } else {
        G parts[V];
        memcpy(parts, &packed, sizeof(packed));
#pragma unroll
        for (int v = 0; v < V; ++v) dst[v] = from_float<S>(to_float(parts[v]));
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const bool inside = row < row_end && col + v < col_end;
        dst[v] = from_float<S>(inside ? to_float(src[row * ld + col + v]) : 0.0f);
      }
    }
  }
}

// Stages the A and B tiles of k-step [k0, k0 + BK) for the kind's operand orientations.
template <GemmKind Kind, int BK, int Pad, int Threads, class S, class P, class TB>
__device__ __forceinline__ void load_operands(S* as, S* bs, const P& p, const TB* b, const GemmTile& t, int64_t n0, int64_t k0) {
  if constexpr (Kind == GemmKind::SumTN) {
    load_tile<BK, kRowTile, kRowTile + Pad, Threads>(as, p.a, p.lda, k0, t.k_end, t.m0, t.m_end, p.a_vector);
  } else {
    load_tile<kRowTile, BK, BK + Pad, Threads>(as, p.a, p.lda, t.m0, t.m_end, k0, t.k_end, p.a_vector);
  }
  if constexpr (Kind == GemmKind::RowsNT) {
    load_tile<kColTile, BK, BK + Pad, Threads>(bs, b, p.ldb, n0, p.n, k0, t.k_end, p.b_vector);
  } else {
    load_tile<BK, kColTile, kColTile + Pad, Threads>(bs, b, p.ldb, k0, t.k_end, n0, p.n, p.b_vector);
  }
}

template <GemmKind Kind, class TB, class TC, class P>
__device__ __forceinline__ void group_operands(const P& p, const GemmTile& t, const TB*& b, TC*& c) {
  b = p.b_table ? reinterpret_cast<const TB*>(p.b_table[t.group]) : p.b;
  c = p.c_table ? reinterpret_cast<TC*>(p.c_table[t.group]) : p.c;
}

// fp32 SIMT: 64x64 tiles, 256 threads of 4x4 outputs, k-steps of 16.
constexpr int kSimtThreads = 256;
constexpr int kSimtK = 16;

template <GemmKind Kind, class TA, class TB, class TC>
__global__ void __launch_bounds__(kSimtThreads) simt_gemm_kernel(GemmProblem<TA, TB, TC> p) {
  constexpr bool a_by_k = Kind == GemmKind::SumTN;   // A tile stored [k][m]
  constexpr bool b_by_n = Kind == GemmKind::RowsNT;  // B tile stored [n][k]
  constexpr int a_ld = a_by_k ? kRowTile + 1 : kSimtK + 1;
  constexpr int b_ld = b_by_n ? kSimtK + 1 : kColTile + 1;
  __shared__ float as[a_by_k ? kSimtK * a_ld : kRowTile * a_ld];
  __shared__ float bs[b_by_n ? kColTile * b_ld : kSimtK * b_ld];
  GemmTile t;
  if (!locate_tile<Kind>(p, t)) return;
  const TB* b;
  TC* c;
  group_operands<Kind>(p, t, b, c);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kColTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = t.k_begin; k0 < t.k_end; k0 += kSimtK) {
    load_operands<Kind, kSimtK, 1, kSimtThreads>(as, bs, p, b, t, n0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = ty + 16 * i;
        av[i] = a_by_k ? as[kk * a_ld + m] : as[m * a_ld + kk];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = tx + 16 * j;
        bv[j] = b_by_n ? bs[n * b_ld + kk] : bs[kk * b_ld + n];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = t.m0 + ty + 16 * i;
    if (m >= t.m_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= p.n) continue;
      TC* out = c + m * p.ldc + n;
      *out = from_float<TC>(p.accumulate ? to_float(*out) + acc[i][j] : acc[i][j]);
    }
  }
}

// bf16 tensor cores: 64x64 tiles, 4 warps of 32x32 (2x2 wmma 16x16x16 fragments), k-steps
// of 32. Shared rows are padded by 8 elements (16 bytes): wmma needs ldm % 8 == 0 and
// 32-byte aligned fragment pointers, which every fragment offset below keeps.
constexpr int kMmaThreads = 128;
constexpr int kMmaK = 32;
constexpr int kMmaPad = 8;
constexpr int kMmaCLd = kColTile + 4;

template <GemmKind Kind, class TC>
__global__ void __launch_bounds__(kMmaThreads) mma_gemm_kernel(GemmProblem<__nv_bfloat16, __nv_bfloat16, TC> p) {
  namespace wmma = nvcuda::wmma;
  constexpr bool a_by_k = Kind == GemmKind::SumTN;
  constexpr bool b_by_n = Kind == GemmKind::RowsNT;
  constexpr int a_ld = a_by_k ? kRowTile + kMmaPad : kMmaK + kMmaPad;
  constexpr int b_ld = b_by_n ? kMmaK + kMmaPad : kColTile + kMmaPad;
  using ALayout = std::conditional_t<a_by_k, wmma::col_major, wmma::row_major>;
  using BLayout = std::conditional_t<b_by_n, wmma::col_major, wmma::row_major>;
  __shared__ __align__(128) __nv_bfloat16 as[a_by_k ? kMmaK * a_ld : kRowTile * a_ld];
  __shared__ __align__(128) __nv_bfloat16 bs[b_by_n ? kColTile * b_ld : kMmaK * b_ld];
  __shared__ __align__(128) float cs[kRowTile * kMmaCLd];
  GemmTile t;
  if (!locate_tile<Kind>(p, t)) return;
  const __nv_bfloat16* b;
  TC* c;
  group_operands<Kind>(p, t, b, c);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kColTile;
  const int warp = threadIdx.x / kWarp;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int64_t k0 = t.k_begin; k0 < t.k_end; k0 += kMmaK) {
    load_operands<Kind, kMmaK, kMmaPad, kMmaThreads>(as, bs, p, b, t, n0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, ALayout> af[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, BLayout> bf[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = wm + 16 * i;
        wmma::load_matrix_sync(af[i], a_by_k ? as + kk * a_ld + m : as + m * a_ld + kk, a_ld);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn + 16 * j;
        wmma::load_matrix_sync(bf[j], b_by_n ? bs + n * b_ld + kk : bs + kk * b_ld + n, b_ld);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wm + 16 * i) * kMmaCLd + wn + 16 * j, acc[i][j], kMmaCLd, wmma::mem_row_major);
  __syncthreads();
  for (int i = threadIdx.x; i < kRowTile * kColTile; i += kMmaThreads) {
    const int r = i / kColTile, cc = i % kColTile;
    const int64_t m = t.m0 + r, n = n0 + cc;
    if (m >= t.m_end || n >= p.n) continue;
    TC* out = c + m * p.ldc + n;
    const float v = cs[r * kMmaCLd + cc];
    *out = from_float<TC>(p.accumulate ? to_float(*out) + v : v);
  }
}

// Launches one GEMM of the kind over contiguous operands. rows (optional) splits m (Rows
// kinds) or k (SumTN) among groups; B (Rows kinds) or C (SumTN) then come from the table.
template <GemmKind Kind, class TA, class TB, class TC>
void gemm(const TA* a, const TB* b, const uintptr_t* b_table, TC* c, const uintptr_t* c_table, bool tables_aligned,
          int64_t m, int64_t n, int64_t k, int64_t groups, const int64_t* group_offset, const int32_t* tile_offset,
          bool accumulate, const char* op) {
  if (m == 0 || n == 0 || (k == 0 && accumulate)) return;
  GemmProblem<TA, TB, TC> p;
  p.a = a;
  p.b = b;
  p.b_table = b_table;
  p.c = c;
  p.c_table = c_table;
  p.m = m;
  p.n = n;
  p.k = k;
  p.lda = Kind == GemmKind::SumTN ? m : k;
  p.ldb = Kind == GemmKind::RowsNT ? k : n;
  p.ldc = n;
  p.groups = group_offset ? groups : 1;
  p.group_offset = group_offset;
  p.tile_offset = tile_offset;
  p.accumulate = accumulate;
  p.a_vector = aligned16(a) && p.lda % (16 / static_cast<int64_t>(sizeof(TA))) == 0;
  p.b_vector = (b_table ? tables_aligned : aligned16(b)) && p.ldb % (16 / static_cast<int64_t>(sizeof(TB))) == 0;
  const int64_t m_tiles = (m + kRowTile - 1) / kRowTile, n_tiles = (n + kColTile - 1) / kColTile;
  // A group adds at most one partial tile, so m_tiles + groups bounds the grouped row tiles.
  const int64_t x_tiles = Kind != GemmKind::SumTN && group_offset ? m_tiles + groups : m_tiles;
  const int64_t z_groups = Kind == GemmKind::SumTN ? p.groups : 1;
  R1_CHECK(x_tiles <= INT_MAX && n_tiles <= 65535 && z_groups <= 65535, "[", op, "] a ", m, " x ", n, " product over ",
           groups, " groups exceeds the grid limits");
  const dim3 grid(static_cast<unsigned>(x_tiles), static_cast<unsigned>(n_tiles), static_cast<unsigned>(z_groups));
  if constexpr (std::is_same_v<TA, __nv_bfloat16> && std::is_same_v<TB, __nv_bfloat16>) {
    mma_gemm_kernel<Kind, TC><<<grid, kMmaThreads, 0, cuda_stream()>>>(p);
  } else {
    simt_gemm_kernel<Kind, TA, TB, TC><<<grid, kSimtThreads, 0, cuda_stream()>>>(p);
  }
  R1_CUDA_CHECK_LAUNCH(op);
}

// ---------------------------------------------------------------------------------------
// Routing: one warp per token.
constexpr int kRouteWarps = 4;

// Order of candidates: larger value first, the lower index on ties (the host's top_k).
__device__ __forceinline__ bool ranks_before(double v, int i, double w, int j) { return v > w || (v == w && i < j); }

// The best of values[0, count) that ranks after (prev_value, prev_index) (any, when !has_prev);
// every lane of the warp gets the same answer. Called k times it lists the top k in order.
__device__ __forceinline__ void warp_next_best(const double* values, int count, bool has_prev, double prev_value,
                                               int prev_index, double& best_value, int& best_index) {
  double bv = -INFINITY;
  int bi = INT_MAX;  // ranks after every real candidate, -inf ones included
  for (int i = threadIdx.x % kWarp; i < count; i += kWarp) {
    const double v = values[i];
    if (has_prev && !ranks_before(prev_value, prev_index, v, i)) continue;
    if (ranks_before(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
  for (int d = kWarp / 2; d > 0; d /= 2) {
    const double ov = __shfl_xor_sync(0xffffffffu, bv, d);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
    if (ranks_before(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  best_value = bv;
  best_index = bi;
}

struct RouteConfig {
  int experts = 0, k = 0, groups = 1, topk_groups = 1;
  bool sigmoid = true, use_bias = false, use_groups = false, norm_topk_prob = true;
  float scale = 1.0f;
};

template <class B>
__global__ void __launch_bounds__(kRouteWarps * kWarp) route_kernel(const float* logits, const B* bias, int64_t tokens,
                                                                    RouteConfig cfg, float* scores, int32_t* topk_idx,
                                                                    float* topk_weight) {
  extern __shared__ __align__(16) unsigned char route_smem[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (n >= tokens) return;  // whole warps only: no block barriers below
  const int experts = cfg.experts;
  double* choice = reinterpret_cast<double*>(route_smem) + warp * (experts + cfg.groups);
  double* group_score = choice + experts;
  const float* l = logits + n * experts;
  float* s = scores + n * experts;

  if (cfg.sigmoid) {
    for (int e = lane; e < experts; e += kWarp) s[e] = 1.0f / (1.0f + expf(-l[e]));
  } else {
    float top = -INFINITY;
    for (int e = lane; e < experts; e += kWarp) top = fmaxf(top, l[e]);
    top = warp_max(top);
    float total = 0.0f;
    for (int e = lane; e < experts; e += kWarp) total += expf(l[e] - top);
    total = warp_sum(total);
    for (int e = lane; e < experts; e += kWarp) s[e] = expf(l[e] - top) / total;
  }
  for (int e = lane; e < experts; e += kWarp)
    choice[e] = static_cast<double>(s[e]) + (cfg.use_bias ? static_cast<double>(to_float(bias[e])) : 0.0);
  __syncwarp();

  if (cfg.use_groups) {
    const int group_size = experts / cfg.groups;
    for (int g = lane; g < cfg.groups; g += kWarp) {
      double first = -INFINITY, second = -INFINITY;
      for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
        const double v = choice[e];
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
      group_score[g] = cfg.use_bias ? first + second : first;
    }
    __syncwarp();
    double last_value = 0.0;
    int last_group = 0;
    for (int r = 0; r < cfg.topk_groups; ++r)
      warp_next_best(group_score, cfg.groups, r > 0, last_value, last_group, last_value, last_group);
    // Groups ranking after the topk_groups-th best are dropped.
    for (int e = lane; e < experts; e += kWarp) {
      const int g = e / group_size;
      if (!ranks_before(group_score[g], g, last_value, last_group) && g != last_group) choice[e] = -INFINITY;
    }
    __syncwarp();
  }

  double value = 0.0;
  int expert = 0;
  float total = 0.0f;
  for (int j = 0; j < cfg.k; ++j) {
    warp_next_best(choice, experts, j > 0, value, expert, value, expert);
    if (lane == 0) {
      topk_idx[n * cfg.k + j] = expert;
      topk_weight[n * cfg.k + j] = s[expert];
      total += s[expert];
    }
  }
  if (lane == 0) {
    const float norm = cfg.norm_topk_prob ? 1.0f / (total + 1e-20f) : 1.0f;
    for (int j = 0; j < cfg.k; ++j) topk_weight[n * cfg.k + j] *= norm * cfg.scale;
  }
}

// ---------------------------------------------------------------------------------------
// Dispatch: the stable counting sort of slots by expert.
__global__ void count_experts_kernel(const int32_t* topk_idx, int64_t slots, int experts, int32_t* chunk_counts) {
  extern __shared__ __align__(16) unsigned char count_smem[];
  int32_t* histogram = reinterpret_cast<int32_t*>(count_smem);
  for (int e = threadIdx.x; e < experts; e += blockDim.x) histogram[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSortChunk, end = min(begin + kSortChunk, slots);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) atomicAdd(&histogram[topk_idx[i]], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) chunk_counts[blockIdx.x * static_cast<int64_t>(experts) + e] = histogram[e];
}

// expert_offset = exclusive scan of the per-expert totals; chunk_counts becomes each chunk's
// first slot per expert.
__global__ void __launch_bounds__(kScanThreads) expert_offsets_kernel(int32_t* chunk_counts, int64_t chunks, int experts,
                                                                      int64_t* expert_offset) {
  block_exclusive_scan<int64_t>(experts, [&](int64_t e) {
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += chunk_counts[c * experts + e];
    return total;
  }, expert_offset);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    int64_t next = expert_offset[e];
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t count = chunk_counts[c * experts + e];
      chunk_counts[c * experts + e] = static_cast<int32_t>(next);
      next += count;
    }
  }
}

// One warp per chunk, 32 slots at a time in flat order: lanes with the same expert rank
// among themselves by lane, after every earlier slot of that expert.
__global__ void __launch_bounds__(kWarp) scatter_slots_kernel(const int32_t* topk_idx, int64_t slots, int k, int experts,
                                                              const int32_t* chunk_base, int32_t* slot_of, int32_t* token_of) {
  extern __shared__ __align__(16) unsigned char scatter_smem[];
  int32_t* next = reinterpret_cast<int32_t*>(scatter_smem);
  const int lane = threadIdx.x;
  for (int e = lane; e < experts; e += kWarp) next[e] = chunk_base[blockIdx.x * static_cast<int64_t>(experts) + e];
  __syncwarp();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kSortChunk, end = min(begin + kSortChunk, slots);
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const bool valid = i < end;
    const int expert = valid ? topk_idx[i] : -1;
    const unsigned same = __match_any_sync(0xffffffffu, expert);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (valid) {
      const int32_t slot = next[expert] + rank;
      slot_of[i] = slot;
      token_of[slot] = static_cast<int32_t>(i / k);
    }
    __syncwarp();
    if (valid && rank == 0) next[expert] += __popc(same);
    __syncwarp();
  }
}

__global__ void __launch_bounds__(kScanThreads) row_tile_offsets_kernel(const int64_t* group_offset, int64_t groups,
                                                                        int32_t* tile_offset) {
  block_exclusive_scan<int32_t>(groups, [&](int64_t g) {
    return static_cast<int32_t>((group_offset[g + 1] - group_offset[g] + kRowTile - 1) / kRowTile);
  }, tile_offset);
}

// ---------------------------------------------------------------------------------------
// Row movement and elementwise kernels.
template <class T>
__global__ void gather_rows_kernel(const T* x, const int32_t* token_of, int64_t dim, T* routed) {
  const int64_t slot = blockIdx.x;
  const T* src = x + token_of[slot] * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) routed[slot * dim + d] = src[d];
}

// out[n] = (accumulate ? out[n] : 0) + sum_j weight[n, j] rows[slot_of[n, j]], j in order;
// weight null means 1.
template <class T>
__global__ void combine_rows_kernel(const T* rows, const int32_t* slot_of, const float* weight, int k, int64_t dim,
                                    bool accumulate, T* out) {
  const int64_t n = blockIdx.x;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = accumulate ? to_float(out[n * dim + d]) : 0.0f;
    for (int j = 0; j < k; ++j) {
      const float w = weight ? weight[n * k + j] : 1.0f;
      acc += w * to_float(rows[static_cast<int64_t>(slot_of[n * k + j]) * dim + d]);
    }
    out[n * dim + d] = from_float<T>(acc);
  }
}

// Per (token, slot), one warp: d_routed[slot] = w dy[n], dweight = dy[n] . routed_y[slot].
template <class T>
__global__ void combine_backward_kernel(const T* dy, const T* routed_y, const int32_t* slot_of, const float* weight,
                                        int64_t pairs, int k, int64_t dim, T* d_routed, float* dweight) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (pair >= pairs) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t n = pair / k, slot = slot_of[pair];
  const float w = weight[pair];
  float dot = 0.0f;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const float g = to_float(dy[n * dim + d]);
    d_routed[slot * dim + d] = from_float<T>(w * g);
    dot += g * to_float(routed_y[slot * dim + d]);
  }
  dot = warp_sum(dot);
  if (lane == 0) dweight[pair] = dot;
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

template <class T>
__global__ void swiglu_kernel(const T* gate, const T* up, int64_t count, T* h) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = to_float(gate[i]);
    h[i] = from_float<T>(a * sigmoid(a) * to_float(up[i]));
  }
}

template <class T>
__global__ void swiglu_backward_kernel(const T* gate, const T* up, const T* dh, int64_t count, T* dgate, T* dup) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = to_float(gate[i]), b = to_float(up[i]), g = to_float(dh[i]);
    const float s = sigmoid(a);
    dgate[i] = from_float<T>(g * b * s * (1.0f + a * (1.0f - s)));
    dup[i] = from_float<T>(g * a * s);
  }
}

// ---------------------------------------------------------------------------------------
// Gate backward and the balance loss.

// Per token: dscores[n, idx_j] += d w_j / d s through the normalization and scaling.
__global__ void weight_backward_kernel(const float* scores, const int32_t* topk_idx, const float* dweight, int64_t tokens,
                                       int experts, int k, bool norm_topk_prob, float scale, float* dscores) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= tokens) return;
  const int32_t* idx = topk_idx + n * k;
  const float* dw = dweight + n * k;
  const float* s = scores + n * experts;
  float* ds = dscores + n * experts;
  if (!norm_topk_prob) {
    for (int j = 0; j < k; ++j) ds[idx[j]] += scale * dw[j];
    return;
  }
  float z = 1e-20f, dot = 0.0f;
  for (int j = 0; j < k; ++j) z += s[idx[j]];
  for (int j = 0; j < k; ++j) dot += dw[j] * s[idx[j]];
  for (int j = 0; j < k; ++j) ds[idx[j]] += scale * (dw[j] / z - dot / (z * z));
}

// One warp per token: dlogits from dscores through sigmoid or softmax.
__global__ void score_backward_kernel(const float* scores, const float* dscores, int64_t tokens, int experts, bool sigmoid,
                                      float* dlogits) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (n >= tokens) return;
  const int lane = threadIdx.x % kWarp;
  const float* s = scores + n * experts;
  const float* ds = dscores + n * experts;
  float* dl = dlogits + n * experts;
  if (sigmoid) {
    for (int e = lane; e < experts; e += kWarp) dl[e] = ds[e] * s[e] * (1.0f - s[e]);
    return;
  }
  float dot = 0.0f;
  for (int e = lane; e < experts; e += kWarp) dot += ds[e] * s[e];
  dot = warp_sum(dot);
  for (int e = lane; e < experts; e += kWarp) dl[e] = s[e] * (ds[e] - dot);
}

// One warp per token: sum_e s[n, e] in double.
__global__ void score_totals_kernel(const float* scores, int64_t tokens, int experts, double* totals) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (n >= tokens) return;
  const int lane = threadIdx.x % kWarp;
  double total = 0.0;
  for (int e = lane; e < experts; e += kWarp) total += static_cast<double>(scores[n * experts + e]);
  total = warp_sum(total);
  if (lane == 0) totals[n] = total;
}

// Per (sequence b, expert e), over b's tokens in order: f = E / (k T) * (slots on e) and
// P = sum_n s[n, e] / S_n (the mean is taken on the host with the loss).
__global__ void balance_terms_kernel(const float* scores, const double* totals, const int32_t* topk_idx, int64_t sequences,
                                     int64_t per_sequence, int experts, int k, double* f, double* prob) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= sequences * experts) return;
  const int64_t b = i / experts;
  const int e = static_cast<int>(i % experts);
  double count = 0.0, p = 0.0;
  for (int64_t n = b * per_sequence; n < (b + 1) * per_sequence; ++n) {
    for (int j = 0; j < k; ++j) count += topk_idx[n * k + j] == e ? 1.0 : 0.0;
    p += static_cast<double>(scores[n * experts + e]) / totals[n];
  }
  f[i] = count * static_cast<double>(experts) / static_cast<double>(k * per_sequence);
  prob[i] = p;
}

// One warp per token: dscores[n, e] += scale (f_e / S_n - sum_m f_m s[n, m] / S_n^2).
__global__ void balance_backward_kernel(const float* scores, const double* totals, const double* f, int64_t tokens,
                                        int64_t per_sequence, int experts, double scale, float* dscores) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (n >= tokens) return;
  const int lane = threadIdx.x % kWarp;
  const double* fb = f + (n / per_sequence) * experts;
  const float* s = scores + n * experts;
  double weighted = 0.0;
  for (int e = lane; e < experts; e += kWarp) weighted += fb[e] * static_cast<double>(s[e]);
  weighted = warp_sum(weighted);
  const double total = totals[n];
  for (int e = lane; e < experts; e += kWarp)
    dscores[n * experts + e] += static_cast<float>(scale * (fb[e] / total - weighted / (total * total)));
}

// b_e += gamma * sign(mean - load_e).
template <class B>
__global__ void update_bias_kernel(const int64_t* loads, int experts, double mean, double gamma, B* bias) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  const double load = static_cast<double>(loads[e]);
  const double direction = load < mean ? 1.0 : (load > mean ? -1.0 : 0.0);
  bias[e] = from_float<B>(to_float(bias[e]) + static_cast<float>(gamma * direction));
}

// ---------------------------------------------------------------------------------------
// Host helpers.
inline void upload(const void* host, void* device, std::size_t bytes, const char* op) {
  if (bytes) R1_CUDA_CHECK(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, cuda_stream()), op);
}

// Waits for the stream: the copy's destination is read on the host right after.
inline void download(const void* device, void* host, std::size_t bytes, const char* op) {
  if (!bytes) return;
  R1_CUDA_CHECK(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, cuda_stream()), op);
  R1_CUDA_CHECK(cudaStreamSynchronize(cuda_stream()), op);
}

inline void zero(void* device, std::size_t bytes, const char* op) {
  if (bytes) R1_CUDA_CHECK(cudaMemsetAsync(device, 0, bytes, cuda_stream()), op);
}

// Blocks of per_block items (threads or warps) covering items, for kernels without a
// grid-stride loop.
inline unsigned blocks_for(int64_t items, int per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

}  // namespace moe_kernels

// ---------------------------------------------------------------------------------------
// Grouped GEMMs as a public API (the MoE layer, its tests and benchmarks use them).

// A split of the rows of [rows, *] matrices among groups: group g owns rows
// [offset[g], offset[g+1]). The grouped GEMMs read it on the device.
struct GroupedRows {
  Tensor<int64_t, Cuda> offset;       // [G + 1]
  Tensor<int32_t, Cuda> tile_offset;  // [G + 1]: the GEMMs' row tiles before each group
  int64_t rows = 0;                   // offset[G], known on the host for the launch grids

  int64_t groups() const { return offset.numel() - 1; }

  // From per-group row counts on the host.
  void assign(const std::vector<int64_t>& counts) {
    R1_CHECK(!counts.empty(), "[grouped_rows.assign] no groups");
    std::vector<int64_t> host(counts.size() + 1, 0);
    for (std::size_t g = 0; g < counts.size(); ++g) {
      R1_CHECK(counts[g] >= 0, "[grouped_rows.assign] group ", g, " has ", counts[g], " rows");
      host[g + 1] = host[g] + counts[g];
    }
    offset.resize(Shape{static_cast<int64_t>(host.size())});
    moe_kernels::upload(host.data(), offset.data(), host.size() * sizeof(int64_t), "grouped_rows.assign");
    rows = host.back();
    update_tiles();
  }

  // Recomputes tile_offset after offset changed on the device.
  void update_tiles() {
    tile_offset.resize(offset.shape());
    moe_kernels::row_tile_offsets_kernel<<<1, moe_kernels::kScanThreads, 0, cuda_stream()>>>(offset.data(), groups(),
                                                                                          tile_offset.data());
    R1_CUDA_CHECK_LAUNCH("grouped_rows.update_tiles");
  }
};

// Same-shaped matrices, one per group (the experts' gate_proj weights, or their gradients),
// as a device table of pointers. assign() uploads the table only when a pointer changed, so
// a training loop uploads it once.
template <class T>
class GroupedMatrices {
 public:
  // get(g) returns group g's Tensor<T, Cuda>.
  template <class Get>
  void assign(int64_t groups, Get&& get, const char* op) {
    R1_CHECK(groups > 0, "[", op, "] no groups");
    std::vector<uintptr_t> pointers(static_cast<std::size_t>(groups));
    aligned_ = true;
    for (int64_t g = 0; g < groups; ++g) {
      const auto& matrix = get(g);
      R1_CHECK(matrix.rank() == 2, "[", op, "] matrix ", g, " has shape ", matrix.shape(), ", expected a matrix");
      R1_CHECK(g == 0 || matrix.shape() == shape_, "[", op, "] matrix ", g, " has shape ", matrix.shape(),
               ", matrix 0 has ", shape_);
      if (g == 0) shape_ = matrix.shape();
      pointers[g] = reinterpret_cast<uintptr_t>(matrix.data());
      aligned_ = aligned_ && moe_kernels::aligned16(matrix.data());
    }
    if (pointers == host_) return;
    host_ = std::move(pointers);
    device_.resize(Shape{groups});
    moe_kernels::upload(host_.data(), device_.data(), host_.size() * sizeof(uintptr_t), op);
  }

  const Shape& shape() const { return shape_; }  // of each matrix
  int64_t groups() const { return static_cast<int64_t>(host_.size()); }
  const uintptr_t* table() const { return device_.data(); }
  bool aligned() const { return aligned_; }

 private:
  Shape shape_;
  std::vector<uintptr_t> host_;
  Tensor<uintptr_t, Cuda> device_;
  bool aligned_ = true;
};

namespace moe_kernels {
template <class T>
void check_grouped(const char* op, const GroupedRows& rows, const GroupedMatrices<T>& w, const View<const T, Cuda>& in,
                   int64_t in_cols, const Shape& out_shape, const Shape& expected_out) {
  R1_CHECK(rows.groups() == w.groups(), "[", op, "] ", rows.groups(), " row groups for ", w.groups(), " matrices");
  R1_CHECK(in.rank() == 2 && in.size(0) == rows.rows && in.size(1) == in_cols && in.is_contiguous(), "[", op,
           "] input has shape ", in.shape(), ", expected contiguous [", rows.rows, ", ", in_cols, "]");
  R1_CHECK(out_shape == expected_out, "[", op, "] output has shape ", out_shape, ", expected ", expected_out);
}
}  // namespace moe_kernels

// y[rows_g] = x[rows_g] W_g^T for every group g in one launch: x [rows, in], W_g [out, in].
template <class T>
void grouped_linear(ConstView<T, Cuda> x, const GroupedMatrices<T>& w, const GroupedRows& rows, View<T, Cuda> y) {
  using namespace moe_kernels;
  const int64_t out = w.shape()[0], in = w.shape()[1];
  check_grouped("grouped_linear", rows, w, x, in, y.shape(), Shape{rows.rows, out});
  R1_CHECK(y.is_contiguous(), "[grouped_linear] y must be contiguous");
  gemm<GemmKind::RowsNT>(dev(x.data()), static_cast<const device_t<T>*>(nullptr), w.table(), dev(y.data()), nullptr,
                         w.aligned(), rows.rows, out, in, rows.groups(), rows.offset.data(), rows.tile_offset.data(),
                         false, "grouped_linear");
}

// dx[rows_g] (+)= dy[rows_g] W_g: dy [rows, out], W_g [out, in], dx [rows, in].
template <class T>
void grouped_linear_backward_input(ConstView<T, Cuda> dy, const GroupedMatrices<T>& w, const GroupedRows& rows,
                                   View<T, Cuda> dx, bool accumulate) {
  using namespace moe_kernels;
  const int64_t out = w.shape()[0], in = w.shape()[1];
  check_grouped("grouped_linear_backward_input", rows, w, dy, out, dx.shape(), Shape{rows.rows, in});
  R1_CHECK(dx.is_contiguous(), "[grouped_linear_backward_input] dx must be contiguous");
  gemm<GemmKind::RowsNN>(dev(dy.data()), static_cast<const device_t<T>*>(nullptr), w.table(), dev(dx.data()), nullptr,
                         w.aligned(), rows.rows, in, out, rows.groups(), rows.offset.data(), rows.tile_offset.data(),
                         accumulate, "grouped_linear_backward_input");
}

// dW_g += dy[rows_g]^T x[rows_g]: the reduction runs over group g's rows only.
template <class T>
void grouped_linear_backward_weight(ConstView<T, Cuda> dy, ConstView<T, Cuda> x, const GroupedRows& rows,
                                    GroupedMatrices<T>& dw) {
  using namespace moe_kernels;
  const int64_t out = dw.shape()[0], in = dw.shape()[1];
  check_grouped("grouped_linear_backward_weight", rows, dw, dy, out, x.shape(), Shape{rows.rows, in});
  R1_CHECK(x.is_contiguous(), "[grouped_linear_backward_weight] x must be contiguous");
  gemm<GemmKind::SumTN>(dev(dy.data()), dev(x.data()), nullptr, static_cast<device_t<T>*>(nullptr), dw.table(),
                        dw.aligned(), out, in, rows.rows, rows.groups(), rows.offset.data(), nullptr, true,
                        "grouped_linear_backward_weight");
}

// ---------------------------------------------------------------------------------------
// Cache: the routing and every intermediate the backward needs, on the device.
template <class T>
struct MoeCache<T, Cuda> {
  Tensor<T, Cuda> x;                        // [N, D], a copy of the input
  Tensor<float, Cuda> logits, scores;       // [N, E], fp32 for any T
  Tensor<int32_t, Cuda> topk_idx;           // [N, k], best first
  Tensor<float, Cuda> topk_weight;          // [N, k], after normalization and scaling
  Tensor<int32_t, Cuda> chunk_counts;       // [chunks, E]: the sort's histograms, then chunk bases
  Tensor<int32_t, Cuda> slot_of, token_of;  // [S]: (token, choice) -> sorted slot; slot -> token
  GroupedRows routed;                       // each expert's sorted slots
  GroupedMatrices<T> w1, w2, w3, dw1, dw2, dw3;
  Tensor<T, Cuda> routed_x, routed_gate, routed_up, routed_h, routed_y;  // [S, D or H], sorted
  Tensor<T, Cuda> shared_gate, shared_up, shared_h;                      // [N, n_shared * H]
  Tensor<double, Cuda> score_totals, balance_f, balance_prob;            // [N], [B, E], [B, E]
  Tensor<T, Cuda> y, dx;
  Tensor<T, Cuda> d_routed, d_routed_h, d_routed_gate, d_routed_up, d_routed_x;
  Tensor<T, Cuda> d_shared_h, d_shared_gate, d_shared_up;
  Tensor<float, Cuda> dweight, dscores, dlogits;
  int64_t sequences = 1;  // B: rows of x[B, S, D] for the sequence-wise loss
  double aux_loss = 0.0;
};

template <>
struct MoeImpl<Cuda> {
  template <class T>
  static void check_params(const Moe<T, Cuda>& p, const char* op) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>, "r1::Moe<T, Cuda>: T must be float or r1::bf16");
    const MoeConfig& cfg = p.config;
    const int64_t d = cfg.dim, e = cfg.n_routed_experts, h = cfg.moe_intermediate_size;
    R1_CHECK(p.gate.weight.shape() == (Shape{e, d}) && !p.gate.has_bias() && p.e_score_correction_bias.shape() == Shape{e},
             "[", op, "] gate weight ", p.gate.weight.shape(), " and bias ", p.e_score_correction_bias.shape(),
             ", expected [", e, ", ", d, "] without a gate bias term, and [", e, "]");
    const auto check_mlp = [&](const Mlp<T, Cuda>& mlp, int64_t hidden, const std::string& name) {
      R1_CHECK(mlp.w1.weight.shape() == (Shape{hidden, d}) && mlp.w3.weight.shape() == (Shape{hidden, d}) &&
                   mlp.w2.weight.shape() == (Shape{d, hidden}) && !mlp.w1.has_bias() && !mlp.w2.has_bias() &&
                   !mlp.w3.has_bias(),
               "[", op, "] ", name, " has gate_proj ", mlp.w1.weight.shape(), ", up_proj ", mlp.w3.weight.shape(),
               ", down_proj ", mlp.w2.weight.shape(), ", expected [", hidden, ", ", d, "] twice and [", d, ", ", hidden,
               "], without biases");
    };
    for (int64_t i = 0; i < e; ++i) check_mlp(p.experts[i], h, "experts." + std::to_string(i));
    if (p.has_shared()) check_mlp(p.shared_experts, cfg.n_shared_experts * h, "shared_experts");
  }

  template <class T>
  static void layer_forward(const Moe<T, Cuda>& p, ConstView<T, Cuda> x, MoeCache<T, Cuda>& c) {
    using namespace moe_kernels;
    using D = device_t<T>;
    const char* op = "moe.forward";
    const MoeConfig& cfg = p.config;
    check_params(p, op);
    const int64_t tokens = x.numel() / cfg.dim, k = cfg.num_experts_per_tok, experts = cfg.n_routed_experts;
    const int64_t dim = cfg.dim, hidden = cfg.moe_intermediate_size, slots = tokens * k;
    const int64_t groups = cfg.topk_method == TopkMethod::Greedy ? 1 : cfg.n_group;
    R1_CHECK(x.is_contiguous(), "[moe.forward] x of shape ", x.shape(), " must be contiguous on the GPU");
    R1_CHECK(tokens > 0, "[moe.forward] x has no tokens");
    R1_CHECK(slots <= INT32_MAX, "[moe.forward] ", tokens, " tokens x ", k, " experts exceed the 2^31 slots of the GPU sort");
    R1_CHECK((experts + groups) * static_cast<int64_t>(sizeof(double)) <= kSmemBytes, "[moe.forward] ", experts,
             " experts and ", groups, " groups exceed the routing kernel's shared memory (E + n_group <= ",
             kSmemBytes / sizeof(double), " on the GPU)");

    c.x.resize(x.shape());
    R1_CUDA_CHECK(cudaMemcpyAsync(c.x.data(), x.data(), x.numel() * sizeof(T), cudaMemcpyDeviceToDevice, cuda_stream()), op);
    const D* xd = dev(c.x.data());

    // Gate and routing.
    c.logits.resize(Shape{tokens, experts});
    c.scores.resize(Shape{tokens, experts});
    gemm<GemmKind::RowsNT>(xd, dev(p.gate.weight.data()), nullptr, c.logits.data(), nullptr, true, tokens, experts, dim, 1,
                           nullptr, nullptr, false, op);
    c.topk_idx.resize(Shape{tokens, k});
    c.topk_weight.resize(Shape{tokens, k});
    RouteConfig route;
    route.experts = static_cast<int>(experts);
    route.k = static_cast<int>(k);
    route.groups = static_cast<int>(groups);
    route.topk_groups = static_cast<int>(cfg.topk_method == TopkMethod::Greedy ? 1 : cfg.topk_group);
    route.sigmoid = cfg.scoring_func == ScoringFunc::Sigmoid;
    route.use_bias = cfg.topk_method == TopkMethod::NoAuxTc;
    route.use_groups = cfg.topk_method != TopkMethod::Greedy;
    route.norm_topk_prob = cfg.norm_topk_prob;
    route.scale = static_cast<float>(cfg.routed_scaling_factor);
    const std::size_t route_smem = kRouteWarps * (experts + groups) * sizeof(double);
    if (route_smem > static_cast<std::size_t>(kSmemBytes)) {
      R1_CUDA_CHECK(cudaFuncSetAttribute(route_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(route_smem)), op);
    }
    route_kernel<D><<<blocks_for(tokens, kRouteWarps), kRouteWarps * kWarp, route_smem, cuda_stream()>>>(
        c.logits.data(), dev(p.e_score_correction_bias.data()), tokens, route, c.scores.data(), c.topk_idx.data(),
        c.topk_weight.data());
    R1_CUDA_CHECK_LAUNCH(op);

    // Dispatch.
    const int64_t chunks = (slots + kSortChunk - 1) / kSortChunk;
    const std::size_t expert_smem = experts * sizeof(int32_t);
    c.chunk_counts.resize(Shape{chunks, experts});
    count_experts_kernel<<<static_cast<unsigned>(chunks), 256, expert_smem, cuda_stream()>>>(
        c.topk_idx.data(), slots, static_cast<int>(experts), c.chunk_counts.data());
    R1_CUDA_CHECK_LAUNCH(op);
    c.routed.offset.resize(Shape{experts + 1});
    expert_offsets_kernel<<<1, kScanThreads, 0, cuda_stream()>>>(c.chunk_counts.data(), chunks, static_cast<int>(experts),
                                                                 c.routed.offset.data());
    R1_CUDA_CHECK_LAUNCH(op);
    c.slot_of.resize(Shape{slots});
    c.token_of.resize(Shape{slots});
    scatter_slots_kernel<<<static_cast<unsigned>(chunks), kWarp, expert_smem, cuda_stream()>>>(
        c.topk_idx.data(), slots, static_cast<int>(k), static_cast<int>(experts), c.chunk_counts.data(), c.slot_of.data(),
        c.token_of.data());
    R1_CUDA_CHECK_LAUNCH(op);
    c.routed.rows = slots;
    c.routed.update_tiles();
    c.routed_x.resize(Shape{slots, dim});
    gather_rows_kernel<<<static_cast<unsigned>(slots), 256, 0, cuda_stream()>>>(xd, c.token_of.data(), dim,
                                                                                dev(c.routed_x.data()));
    R1_CUDA_CHECK_LAUNCH(op);

    // Routed experts: three grouped GEMMs and the SwiGLU between them.
    c.w1.assign(experts, [&](int64_t e) -> const Tensor<T, Cuda>& { return p.experts[e].w1.weight; }, op);
    c.w2.assign(experts, [&](int64_t e) -> const Tensor<T, Cuda>& { return p.experts[e].w2.weight; }, op);
    c.w3.assign(experts, [&](int64_t e) -> const Tensor<T, Cuda>& { return p.experts[e].w3.weight; }, op);
    c.routed_gate.resize(Shape{slots, hidden});
    c.routed_up.resize(Shape{slots, hidden});
    c.routed_h.resize(Shape{slots, hidden});
    c.routed_y.resize(Shape{slots, dim});
    grouped_linear<T>(c.routed_x, c.w1, c.routed, c.routed_gate);
    grouped_linear<T>(c.routed_x, c.w3, c.routed, c.routed_up);
    swiglu(c.routed_gate, c.routed_up, c.routed_h, op);
    grouped_linear<T>(c.routed_h, c.w2, c.routed, c.routed_y);

    // Shared experts, then the weighted combine on top.
    c.y.resize(x.shape());
    if (p.has_shared()) {
      const int64_t width = cfg.n_shared_experts * hidden;
      c.shared_gate.resize(Shape{tokens, width});
      c.shared_up.resize(Shape{tokens, width});
      c.shared_h.resize(Shape{tokens, width});
      gemm<GemmKind::RowsNT>(xd, dev(p.shared_experts.w1.weight.data()), nullptr, dev(c.shared_gate.data()), nullptr, true,
                             tokens, width, dim, 1, nullptr, nullptr, false, op);
      gemm<GemmKind::RowsNT>(xd, dev(p.shared_experts.w3.weight.data()), nullptr, dev(c.shared_up.data()), nullptr, true,
                             tokens, width, dim, 1, nullptr, nullptr, false, op);
      swiglu(c.shared_gate, c.shared_up, c.shared_h, op);
      gemm<GemmKind::RowsNT>(dev(c.shared_h.data()), dev(p.shared_experts.w2.weight.data()), nullptr, dev(c.y.data()),
                             nullptr, true, tokens, dim, width, 1, nullptr, nullptr, false, op);
    }
    combine_rows_kernel<<<static_cast<unsigned>(tokens), 256, 0, cuda_stream()>>>(
        dev(c.routed_y.data()), c.slot_of.data(), c.topk_weight.data(), static_cast<int>(k), dim, p.has_shared(),
        dev(c.y.data()));
    R1_CUDA_CHECK_LAUNCH(op);
    c.aux_loss = cfg.aux_loss_alpha > 0.0 ? balance_loss(cfg, c) : 0.0;
  }

  template <class T>
  static void layer_backward(const Moe<T, Cuda>& p, MoeCache<T, Cuda>& c, ConstView<T, Cuda> dy, Moe<T, Cuda>& grads) {
    using namespace moe_kernels;
    const char* op = "moe.backward";
    const MoeConfig& cfg = p.config;
    check_params(grads, op);
    R1_CHECK(dy.is_contiguous(), "[moe.backward] dy of shape ", dy.shape(), " must be contiguous on the GPU");
    const int64_t tokens = c.topk_idx.size(0), k = cfg.num_experts_per_tok, experts = cfg.n_routed_experts;
    const int64_t dim = cfg.dim, hidden = cfg.moe_intermediate_size, slots = tokens * k;
    const auto* dyd = dev(dy.data());
    const auto* xd = dev(c.x.data());

    // Combine: d routed_y = w dy[token], dw = dy[token] . routed_y.
    c.d_routed.resize(Shape{slots, dim});
    c.dweight.resize(Shape{tokens, k});
    constexpr int warps = 8;
    combine_backward_kernel<<<blocks_for(slots, warps), warps * kWarp, 0, cuda_stream()>>>(
        dyd, dev(c.routed_y.data()), c.slot_of.data(), c.topk_weight.data(), slots, static_cast<int>(k), dim,
        dev(c.d_routed.data()), c.dweight.data());
    R1_CUDA_CHECK_LAUNCH(op);

    // Routed experts.
    c.dw1.assign(experts, [&](int64_t e) -> const Tensor<T, Cuda>& { return grads.experts[e].w1.weight; }, op);
    c.dw2.assign(experts, [&](int64_t e) -> const Tensor<T, Cuda>& { return grads.experts[e].w2.weight; }, op);
    c.dw3.assign(experts, [&](int64_t e) -> const Tensor<T, Cuda>& { return grads.experts[e].w3.weight; }, op);
    c.d_routed_h.resize(Shape{slots, hidden});
    c.d_routed_gate.resize(Shape{slots, hidden});
    c.d_routed_up.resize(Shape{slots, hidden});
    c.d_routed_x.resize(Shape{slots, dim});
    grouped_linear_backward_input<T>(c.d_routed, c.w2, c.routed, c.d_routed_h, false);
    grouped_linear_backward_weight<T>(c.d_routed, c.routed_h, c.routed, c.dw2);
    swiglu_backward(c.routed_gate, c.routed_up, c.d_routed_h, c.d_routed_gate, c.d_routed_up, op);
    grouped_linear_backward_input<T>(c.d_routed_gate, c.w1, c.routed, c.d_routed_x, false);
    grouped_linear_backward_input<T>(c.d_routed_up, c.w3, c.routed, c.d_routed_x, true);
    grouped_linear_backward_weight<T>(c.d_routed_gate, c.routed_x, c.routed, c.dw1);
    grouped_linear_backward_weight<T>(c.d_routed_up, c.routed_x, c.routed, c.dw3);

    // dx = shared experts' backward + each token's routed rows in slot order + the gate path.
    c.dx.resize(c.y.shape());
    T* dxd_raw = c.dx.data();
    if (p.has_shared()) {
      const int64_t width = cfg.n_shared_experts * hidden;
      const Mlp<T, Cuda>& sp = p.shared_experts;
      Mlp<T, Cuda>& sg = grads.shared_experts;
      c.d_shared_h.resize(Shape{tokens, width});
      c.d_shared_gate.resize(Shape{tokens, width});
      c.d_shared_up.resize(Shape{tokens, width});
      gemm<GemmKind::RowsNN>(dyd, dev(sp.w2.weight.data()), nullptr, dev(c.d_shared_h.data()), nullptr, true, tokens, width,
                             dim, 1, nullptr, nullptr, false, op);
      gemm<GemmKind::SumTN>(dyd, dev(c.shared_h.data()), nullptr, dev(sg.w2.weight.data()), nullptr, true, dim, width,
                            tokens, 1, nullptr, nullptr, true, op);
      swiglu_backward(c.shared_gate, c.shared_up, c.d_shared_h, c.d_shared_gate, c.d_shared_up, op);
      gemm<GemmKind::RowsNN>(dev(c.d_shared_gate.data()), dev(sp.w1.weight.data()), nullptr, dev(dxd_raw), nullptr, true,
                             tokens, dim, width, 1, nullptr, nullptr, false, op);
      gemm<GemmKind::RowsNN>(dev(c.d_shared_up.data()), dev(sp.w3.weight.data()), nullptr, dev(dxd_raw), nullptr, true,
                             tokens, dim, width, 1, nullptr, nullptr, true, op);
      gemm<GemmKind::SumTN>(dev(c.d_shared_gate.data()), xd, nullptr, dev(sg.w1.weight.data()), nullptr, true, width, dim,
                            tokens, 1, nullptr, nullptr, true, op);
      gemm<GemmKind::SumTN>(dev(c.d_shared_up.data()), xd, nullptr, dev(sg.w3.weight.data()), nullptr, true, width, dim,
                            tokens, 1, nullptr, nullptr, true, op);
    }
    combine_rows_kernel<<<static_cast<unsigned>(tokens), 256, 0, cuda_stream()>>>(
        dev(c.d_routed_x.data()), c.slot_of.data(), static_cast<const float*>(nullptr), static_cast<int>(k), dim,
        p.has_shared(), dev(dxd_raw));
    R1_CUDA_CHECK_LAUNCH(op);

    // Gate: the weights' gradient through their normalization, the balance loss, the scores.
    c.dscores.resize(c.scores.shape());
    zero(c.dscores.data(), c.dscores.numel() * sizeof(float), op);
    weight_backward_kernel<<<blocks_for(tokens, 128), 128, 0, cuda_stream()>>>(
        c.scores.data(), c.topk_idx.data(), c.dweight.data(), tokens, static_cast<int>(experts), static_cast<int>(k),
        cfg.norm_topk_prob, static_cast<float>(cfg.routed_scaling_factor), c.dscores.data());
    R1_CUDA_CHECK_LAUNCH(op);
    if (cfg.aux_loss_alpha > 0.0) {
      const int64_t sequences = cfg.seq_aux ? c.sequences : 1, per_sequence = tokens / sequences;
      const double scale = cfg.aux_loss_alpha / static_cast<double>(per_sequence) / static_cast<double>(sequences);
      balance_backward_kernel<<<blocks_for(tokens, warps), warps * kWarp, 0, cuda_stream()>>>(
          c.scores.data(), c.score_totals.data(), c.balance_f.data(), tokens, per_sequence, static_cast<int>(experts), scale,
          c.dscores.data());
      R1_CUDA_CHECK_LAUNCH(op);
    }
    c.dlogits.resize(c.scores.shape());
    score_backward_kernel<<<blocks_for(tokens, warps), warps * kWarp, 0, cuda_stream()>>>(
        c.scores.data(), c.dscores.data(), tokens, static_cast<int>(experts), cfg.scoring_func == ScoringFunc::Sigmoid,
        c.dlogits.data());
    R1_CUDA_CHECK_LAUNCH(op);
    gemm<GemmKind::RowsNN>(static_cast<const float*>(c.dlogits.data()), dev(p.gate.weight.data()), nullptr, dev(dxd_raw),
                           nullptr, true, tokens, dim, experts, 1, nullptr, nullptr, true, op);
    gemm<GemmKind::SumTN>(static_cast<const float*>(c.dlogits.data()), xd, nullptr, dev(grads.gate.weight.data()), nullptr,
                          true, experts, dim, tokens, 1, nullptr, nullptr, true, op);
  }

  template <class T>
  static std::vector<int64_t> tokens_per_expert(const MoeConfig& cfg, const MoeCache<T, Cuda>& c) {
    std::vector<int64_t> offset(static_cast<std::size_t>(cfg.n_routed_experts + 1));
    R1_CHECK(c.routed.offset.numel() == cfg.n_routed_experts + 1, "[moe.routing_stats] the cache holds the routing of ",
             c.routed.offset.numel() - 1, " experts, the layer has ", cfg.n_routed_experts);
    moe_kernels::download(c.routed.offset.data(), offset.data(), offset.size() * sizeof(int64_t), "moe.routing_stats");
    std::vector<int64_t> counts(static_cast<std::size_t>(cfg.n_routed_experts));
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e) counts[e] = offset[e + 1] - offset[e];
    return counts;
  }

  template <class T>
  static void update_bias(Moe<T, Cuda>& p, const std::vector<int64_t>& tokens_per_expert, double gamma) {
    const int64_t experts = p.config.n_routed_experts;
    R1_CHECK(p.e_score_correction_bias.numel() == experts, "[moe.update_bias] the bias has shape ",
             p.e_score_correction_bias.shape(), ", expected [", experts, "]");
    int64_t total = 0;
    for (int64_t load : tokens_per_expert) total += load;
    const double mean = static_cast<double>(total) / static_cast<double>(experts);
    Tensor<int64_t, Cuda> loads;
    loads.resize(Shape{experts});  // not zero-filled: a cudaMemset would race the upload on a non-blocking stream
    moe_kernels::upload(tokens_per_expert.data(), loads.data(), tokens_per_expert.size() * sizeof(int64_t), "moe.update_bias");
    moe_kernels::update_bias_kernel<<<moe_kernels::blocks_for(experts, 256), 256, 0, cuda_stream()>>>(
        loads.data(), static_cast<int>(experts), mean, gamma, moe_kernels::dev(p.e_score_correction_bias.data()));
    R1_CUDA_CHECK_LAUNCH("moe.update_bias");
    cuda_synchronize("moe.update_bias");  // loads is freed on return; once a step, so the wait is cheap
  }

 private:
  template <class T>
  static void swiglu(const Tensor<T, Cuda>& gate, const Tensor<T, Cuda>& up, Tensor<T, Cuda>& h, const char* op) {
    using namespace moe_kernels;
    const int64_t count = gate.numel();
    if (count == 0) return;
    swiglu_kernel<<<cuda_blocks(count), 256, 0, cuda_stream()>>>(dev(gate.data()), dev(up.data()), count, dev(h.data()));
    R1_CUDA_CHECK_LAUNCH(op);
  }

  template <class T>
  static void swiglu_backward(const Tensor<T, Cuda>& gate, const Tensor<T, Cuda>& up, const Tensor<T, Cuda>& dh,
                              Tensor<T, Cuda>& dgate, Tensor<T, Cuda>& dup, const char* op) {
    using namespace moe_kernels;
    const int64_t count = gate.numel();
    if (count == 0) return;
    swiglu_backward_kernel<<<cuda_blocks(count), 256, 0, cuda_stream()>>>(dev(gate.data()), dev(up.data()), dev(dh.data()),
                                                                         count, dev(dgate.data()), dev(dup.data()));
    R1_CUDA_CHECK_LAUNCH(op);
  }

  // The balance loss of the routing in the cache; keeps f for the backward.
  template <class T>
  static double balance_loss(const MoeConfig& cfg, MoeCache<T, Cuda>& c) {
    using namespace moe_kernels;
    const char* op = "moe.forward";
    const int64_t tokens = c.topk_idx.size(0), experts = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
    const int64_t sequences = cfg.seq_aux ? c.sequences : 1, per_sequence = tokens / sequences;
    constexpr int warps = 8;
    c.score_totals.resize(Shape{tokens});
    score_totals_kernel<<<blocks_for(tokens, warps), warps * kWarp, 0, cuda_stream()>>>(
        c.scores.data(), tokens, static_cast<int>(experts), c.score_totals.data());
    R1_CUDA_CHECK_LAUNCH(op);
    c.balance_f.resize(Shape{sequences, experts});
    c.balance_prob.resize(Shape{sequences, experts});
    balance_terms_kernel<<<blocks_for(sequences * experts, 128), 128, 0, cuda_stream()>>>(
        c.scores.data(), c.score_totals.data(), c.topk_idx.data(), sequences, per_sequence, static_cast<int>(experts),
        static_cast<int>(k), c.balance_f.data(), c.balance_prob.data());
    R1_CUDA_CHECK_LAUNCH(op);
    std::vector<double> f(static_cast<std::size_t>(sequences * experts)), prob(f.size());
    download(c.balance_f.data(), f.data(), f.size() * sizeof(double), op);
    download(c.balance_prob.data(), prob.data(), prob.size() * sizeof(double), op);
    double loss = 0.0;  // in the host path's order
    for (int64_t b = 0; b < sequences; ++b)
      for (int64_t e = 0; e < experts; ++e)
        loss += cfg.aux_loss_alpha * f[b * experts + e] * prob[b * experts + e] / static_cast<double>(per_sequence) /
                static_cast<double>(sequences);
    return loss;
  }
};

}  // namespace r1
