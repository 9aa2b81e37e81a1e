// r1/cuda/mla.cuh: MlaImpl<Cuda>, Multi-head Latent Attention on the GPU (fp32).
//
// Training path (causal, flash-style, FlashAttention-2):
//   forward   per (b, h) and tile of 32 queries: S = scale Q K^T over key tiles of 32 with an
//             online softmax in fp32 (running max m and sum l per row), O = P V / l; S x S is
//             never stored, only lse = m + ln l per row.
//   backward  delta = rowsum(dO * O); P is recomputed as exp(scale Q K^T - lse), dS = P (dO V^T - delta).
//             dK = scale dS^T Q and dV = P^T dO in one kernel per key tile (a loop over query
//             tiles), dQ = scale dS K in another per query tile (a loop over key tiles): every
//             output has one writer, so the result is deterministic (no atomics).
//   MLA's keys are [k_nope (per head) | k_pe (one head shared by all)]: the kernels read them in
//   place through HeadTensor, and dk_pe is the head-ordered sum of each head's part.
// Absorbed decode over the paged latent cache (FlashMLA's problem, d_k = C + R, d_v = C):
//   qcat[b, h*T + j] = [q_nope W_UK[h] | q_pe]                                       [B, H*T, C+R]
//   split-KV: CTA (split, group of 16 rows, b) reads each 16-token tile of its blocks once for
//   its rows (16-byte loads, double-buffered with cp.async), keeps an online softmax, and writes
//   o_split = sum_t p_t ckv_t / l and lse_split; a combine kernel merges the splits by their
//   log-sum-exps in split order. o_lat W_UV[h]^T then gives attn, as on the CPU.
// Latent cache: MlaKvCache<float, Cuda> (r1/mla.hpp) keeps its block tables on the host and
// its pool on the device; append copies rows with copy_rows (cudaMemcpy2DAsync per block).
//
// Legend: B batch, S sequence, H heads, N qk_nope_head_dim, R qk_rope_head_dim, Dq = N + R,
// V v_head_dim, C kv_lora_rank, T new tokens per sequence, L cached length.
// Limits: Dq, V <= 256 (training); C % 4 == 0, R % 4 == 0, C <= 512, C + R <= 576 (decode).
//
// Provides MlaImpl<Cuda>: attention_forward, attention_backward, absorbed_attention (what
// r1::forward / backward / forward_absorbed call), the decode core on its own
// (stage_block_tables + latent_attention), copy_rows and add.
#pragma once

#include "tensor.cuh"
#include "../mla.hpp"

#include <cuda_pipeline.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace r1 {

namespace mla_cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// Training attention: tiles, operands and warp-level helpers.

constexpr int kTile = 32;          // query rows and key rows per tile
constexpr int kRowsPerWarp = 8;    // each warp owns 8 rows of its tile; lanes index the other tile
constexpr int kFlashThreads = kTile / kRowsPerWarp * 32;

// Element (b, s, h, d) of a [B, S, H, D] operand: d < split reads lo, d >= split reads hi at
// d - split. MLA's keys are k_nope (lo, per head) then k_pe (hi, head stride 0: shared).
template <class E>
struct HeadTensor {
  E* lo = nullptr;
  int64_t lo_batch = 0, lo_token = 0, lo_head = 0;
  E* hi = nullptr;
  int64_t hi_batch = 0, hi_token = 0, hi_head = 0;
  int split = 0, dim = 0;

  __device__ E& at(int64_t b, int64_t s, int64_t h, int d) const {
    return d < split ? lo[b * lo_batch + s * lo_token + h * lo_head + d]
                     : hi[b * hi_batch + s * hi_token + h * hi_head + (d - split)];
  }
};

// A one-part operand whose token rows are `token` apart and heads `head` apart.
template <class E>
HeadTensor<E> head_tensor(E* data, int64_t S, int64_t token, int64_t head, int64_t dim) {
  HeadTensor<E> t;
  t.lo = data;
  t.lo_batch = S * token;
  t.lo_token = token;
  t.lo_head = head;
  t.split = static_cast<int>(dim);
  t.dim = static_cast<int>(dim);
  return t;
}

// Shared-memory row pitch for dim floats: whole float4s, an odd count of them, so the 8 lanes
// of a 16-byte load phase that read 8 different rows hit 8 different bank groups.
inline int tile_pitch(int64_t dim) { return 4 * (static_cast<int>((dim + 3) / 4) | 1); }

// Rows [t0, t0 + kTile) of head (b, h) into tile [kTile, pitch]; zeros past S and past dim.
template <class E>
__device__ void load_tile(float* tile, int pitch, const HeadTensor<E>& x, int64_t b, int64_t h, int t0, int S) {
  for (int i = threadIdx.x; i < kTile * pitch; i += blockDim.x) {
    const int r = i / pitch, d = i % pitch, s = t0 + r;
    tile[i] = (s < S && d < x.dim) ? x.at(b, s, h, d) : 0.0f;
  }
}

// out[r] = a_r . b over d4 float4s, for the warp's kRowsPerWarp rows of a (the same for every
// lane: broadcast reads) and this lane's row b.
__device__ inline void row_dots(const float* a, const float* b, int pitch, int d4, float (&out)[kRowsPerWarp]) {
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) out[r] = 0.0f;
  for (int k = 0; k < d4; ++k) {
    const float4 bv = reinterpret_cast<const float4*>(b)[k];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float4 av = reinterpret_cast<const float4*>(a + r * pitch)[k];
      out[r] = fmaf(av.x, bv.x, fmaf(av.y, bv.y, fmaf(av.z, bv.z, fmaf(av.w, bv.w, out[r]))));
    }
  }
}

// acc[r][i] += sum_j coef_r(j) tile[j][lane + 32 i] for columns < dim, where coef_r(j) is row
// r's coefficient held by lane j: a [rows x 32] by [32 x dim] product, one column per lane.
template <int kSlots>
__device__ void accumulate_columns(float (&acc)[kRowsPerWarp][kSlots], const float (&coef)[kRowsPerWarp],
                                   const float* tile, int pitch, int dim, int lane) {
  for (int j = 0; j < kTile; ++j) {
    float c[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) c[r] = __shfl_sync(kFullMask, coef[r], j);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int col = lane + 32 * i;
      const float v = col < dim ? tile[j * pitch + col] : 0.0f;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r][i] = fmaf(c[r], v, acc[r][i]);
    }
  }
}

__device__ inline float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

__device__ inline float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

struct FlashShape {
  int B = 0, S = 0, H = 0, dq = 0, dv = 0;  // dq: query/key dim, dv: value dim
  int pitch_qk = 0, pitch_v = 0;
  float scale = 0.0f;
  __host__ __device__ int tiles() const { return (S + kTile - 1) / kTile; }
};

// Grid (tiles, H, B). Query tiles run longest first (tile tiles-1 has the most key tiles).
template <int kVSlots>
__global__ void __launch_bounds__(kFlashThreads) flash_forward_kernel(FlashShape sh, HeadTensor<const float> q,
                                                                        HeadTensor<const float> k, HeadTensor<const float> v,
                                                                        HeadTensor<float> o, float* lse) {
  extern __shared__ float4 flash_smem[];
  float* qs = reinterpret_cast<float*>(flash_smem);
  float* ks = qs + kTile * sh.pitch_qk;
  float* vs = ks + kTile * sh.pitch_qk;
  const int qt = sh.tiles() - 1 - static_cast<int>(blockIdx.x), h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q0 = qt * kTile;
  const int d4 = (sh.dq + 3) / 4;
  load_tile(qs, sh.pitch_qk, q, b, h, q0, sh.S);
  const float* my_q = qs + warp * kRowsPerWarp * sh.pitch_qk;
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kVSlots] = {};
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  for (int kt = 0; kt <= qt; ++kt) {
    __syncthreads();  // the previous K, V tiles are no longer read
    load_tile(ks, sh.pitch_qk, k, b, h, kt * kTile, sh.S);
    load_tile(vs, sh.pitch_v, v, b, h, kt * kTile, sh.S);
    __syncthreads();
    float s[kRowsPerWarp], p[kRowsPerWarp];
    row_dots(my_q, ks + lane * sh.pitch_qk, sh.pitch_qk, d4, s);
    const int key = kt * kTile + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int query = q0 + warp * kRowsPerWarp + r;
      const float sr = (key <= query && key < sh.S) ? s[r] * sh.scale : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sr));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet: keep exp() finite
      const float alpha = expf(m[r] - m_use);
      p[r] = expf(sr - m_use);
      l[r] = l[r] * alpha + warp_sum(p[r]);
      m[r] = m_new;
#pragma unroll
      for (int i = 0; i < kVSlots; ++i) acc[r][i] *= alpha;
    }
    accumulate_columns(acc, p, vs, sh.pitch_v, sh.dv, lane);
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int query = q0 + warp * kRowsPerWarp + r;
    if (query >= sh.S) continue;
    const float inv = 1.0f / l[r];
#pragma unroll
    for (int i = 0; i < kVSlots; ++i) {
      const int col = lane + 32 * i;
      if (col < sh.dv) o.at(b, query, h, col) = acc[r][i] * inv;
    }
    if (lane == 0) lse[(static_cast<int64_t>(b) * sh.H + h) * sh.S + query] = m[r] + logf(l[r]);
  }
}

// delta[b, h, s] = sum_c dO[b, s, h, c] O[b, s, h, c]: one warp per row.
__global__ void flash_delta_kernel(FlashShape sh, HeadTensor<const float> dout, HeadTensor<const float> out, float* delta) {
  const int64_t rows = static_cast<int64_t>(sh.B) * sh.H * sh.S;
  const int lane = threadIdx.x % 32;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x / 32) {
    const int64_t s = row % sh.S, h = (row / sh.S) % sh.H, b = row / (static_cast<int64_t>(sh.S) * sh.H);
    float sum = 0.0f;
    for (int c = lane; c < sh.dv; c += 32) sum = fmaf(dout.at(b, s, h, c), out.at(b, s, h, c), sum);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
  }
}

// dQ per query tile: grid (tiles, H, B); warps own query rows, lanes keys.
template <int kQSlots>
__global__ void __launch_bounds__(kFlashThreads) flash_dq_kernel(FlashShape sh, HeadTensor<const float> q,
                                                                   HeadTensor<const float> k, HeadTensor<const float> v,
                                                                   HeadTensor<const float> dout, const float* lse,
                                                                   const float* delta, HeadTensor<float> dq) {
  extern __shared__ float4 flash_smem[];
  float* qs = reinterpret_cast<float*>(flash_smem);
  float* ks = qs + kTile * sh.pitch_qk;
  float* dos = ks + kTile * sh.pitch_qk;
  float* vs = dos + kTile * sh.pitch_v;
  const int qt = sh.tiles() - 1 - static_cast<int>(blockIdx.x), h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q0 = qt * kTile;
  const int dq4 = (sh.dq + 3) / 4, dv4 = (sh.dv + 3) / 4;
  load_tile(qs, sh.pitch_qk, q, b, h, q0, sh.S);
  load_tile(dos, sh.pitch_v, dout, b, h, q0, sh.S);
  float row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], acc[kRowsPerWarp][kQSlots] = {};
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int query = q0 + warp * kRowsPerWarp + r;
    const int64_t at = (static_cast<int64_t>(b) * sh.H + h) * sh.S + query;
    row_lse[r] = query < sh.S ? lse[at] : 0.0f;
    row_delta[r] = query < sh.S ? delta[at] : 0.0f;
  }
  for (int kt = 0; kt <= qt; ++kt) {
    __syncthreads();
    load_tile(ks, sh.pitch_qk, k, b, h, kt * kTile, sh.S);
    load_tile(vs, sh.pitch_v, v, b, h, kt * kTile, sh.S);
    __syncthreads();
    float s[kRowsPerWarp], dp[kRowsPerWarp], ds[kRowsPerWarp];
    row_dots(qs + warp * kRowsPerWarp * sh.pitch_qk, ks + lane * sh.pitch_qk, sh.pitch_qk, dq4, s);
    row_dots(dos + warp * kRowsPerWarp * sh.pitch_v, vs + lane * sh.pitch_v, sh.pitch_v, dv4, dp);
    const int key = kt * kTile + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int query = q0 + warp * kRowsPerWarp + r;
      const bool visible = key <= query && key < sh.S && query < sh.S;
      const float p = visible ? expf(s[r] * sh.scale - row_lse[r]) : 0.0f;
      ds[r] = p * (dp[r] - row_delta[r]);
    }
    accumulate_columns(acc, ds, ks, sh.pitch_qk, sh.dq, lane);
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int query = q0 + warp * kRowsPerWarp + r;
    if (query >= sh.S) continue;
#pragma unroll
    for (int i = 0; i < kQSlots; ++i) {
      const int col = lane + 32 * i;
      if (col < sh.dq) dq.at(b, query, h, col) = sh.scale * acc[r][i];
    }
  }
}

// dK and dV per key tile: grid (tiles, H, B); warps own key rows, lanes queries. Key tiles
// run in order (tile 0 sees every query tile).
template <int kQSlots, int kVSlots>
__global__ void __launch_bounds__(kFlashThreads) flash_dkdv_kernel(FlashShape sh, HeadTensor<const float> q,
                                                                     HeadTensor<const float> k, HeadTensor<const float> v,
                                                                     HeadTensor<const float> dout, const float* lse,
                                                                     const float* delta, HeadTensor<float> dk,
                                                                     HeadTensor<float> dv) {
  extern __shared__ float4 flash_smem[];
  float* ks = reinterpret_cast<float*>(flash_smem);
  float* qs = ks + kTile * sh.pitch_qk;
  float* vs = qs + kTile * sh.pitch_qk;
  float* dos = vs + kTile * sh.pitch_v;
  const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, k0 = kt * kTile;
  const int dq4 = (sh.dq + 3) / 4, dv4 = (sh.dv + 3) / 4;
  load_tile(ks, sh.pitch_qk, k, b, h, k0, sh.S);
  load_tile(vs, sh.pitch_v, v, b, h, k0, sh.S);
  float dk_acc[kRowsPerWarp][kQSlots] = {}, dv_acc[kRowsPerWarp][kVSlots] = {};
  for (int qt = kt; qt < sh.tiles(); ++qt) {
    __syncthreads();
    load_tile(qs, sh.pitch_qk, q, b, h, qt * kTile, sh.S);
    load_tile(dos, sh.pitch_v, dout, b, h, qt * kTile, sh.S);
    __syncthreads();
    const int query = qt * kTile + lane;
    const int64_t at = (static_cast<int64_t>(b) * sh.H + h) * sh.S + query;
    const float query_lse = query < sh.S ? lse[at] : 0.0f, query_delta = query < sh.S ? delta[at] : 0.0f;
    float s[kRowsPerWarp], dp[kRowsPerWarp], p[kRowsPerWarp], ds[kRowsPerWarp];
    row_dots(ks + warp * kRowsPerWarp * sh.pitch_qk, qs + lane * sh.pitch_qk, sh.pitch_qk, dq4, s);
    row_dots(vs + warp * kRowsPerWarp * sh.pitch_v, dos + lane * sh.pitch_v, sh.pitch_v, dv4, dp);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int key = k0 + warp * kRowsPerWarp + r;
      const bool visible = key <= query && query < sh.S && key < sh.S;
      p[r] = visible ? expf(s[r] * sh.scale - query_lse) : 0.0f;
      ds[r] = p[r] * (dp[r] - query_delta);
    }
    accumulate_columns(dv_acc, p, dos, sh.pitch_v, sh.dv, lane);
    accumulate_columns(dk_acc, ds, qs, sh.pitch_qk, sh.dq, lane);
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int key = k0 + warp * kRowsPerWarp + r;
    if (key >= sh.S) continue;
#pragma unroll
    for (int i = 0; i < kQSlots; ++i) {
      const int col = lane + 32 * i;
      if (col < sh.dq) dk.at(b, key, h, col) = sh.scale * dk_acc[r][i];
    }
#pragma unroll
    for (int i = 0; i < kVSlots; ++i) {
      const int col = lane + 32 * i;
      if (col < sh.dv) dv.at(b, key, h, col) = dv_acc[r][i];
    }
  }
}

// out[t, :] = sum over h of parts[t, h, :] in head order: parts [rows, H, R] -> out [rows, R].
__global__ void sum_heads_kernel(const float* parts, float* out, int64_t rows, int H, int R) {
  const int64_t n = rows * R;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / R, d = i % R;
    float sum = 0.0f;
    for (int h = 0; h < H; ++h) sum += parts[(t * H + h) * R + d];
    out[i] = sum;
  }
}

__global__ void add_kernel(const float* src, float* dst, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

// Calls f(std::integral_constant<int, slots>) with 32-column slots enough for dim (<= 256).
template <class F>
void with_column_slots(int64_t dim, F&& f) {
  if (dim <= 4 * 32) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// Opts a kernel into `bytes` of dynamic shared memory after checking the device allows it.
template <class Kernel>
void reserve_shared_memory(Kernel kernel, std::size_t bytes, const char* op) {
  int device = 0, limit = 0;
  R1_CUDA_CHECK(cudaGetDevice(&device), op);
  R1_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), op);
  R1_CHECK(bytes <= static_cast<std::size_t>(limit), "[", op, "] needs ", bytes, " bytes of shared memory per block, the device has ",
           limit);
  R1_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), op);
}

inline int multiprocessor_count(const char* op) {
  int device = 0, count = 0;
  R1_CUDA_CHECK(cudaGetDevice(&device), op);
  R1_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), op);
  return count;
}

// ---------------------------------------------------------------------------------------
// Absorbed decode.

constexpr int kDecodeThreads = 256;                 // 8 warps, each 2 rows (a half-warp per row)
constexpr int kDecodeRows = kDecodeThreads / 16;    // query rows (head x new token) per CTA
constexpr int kDecodeTileTokens = 16;               // tokens per shared-memory tile (one of two buffers)
static_assert(kDecodeTileTokens == 16, "lane l16 of a half-warp holds the score of tile token l16");
constexpr int kRowFloat4s = 9;                      // per lane of a half-warp: 9 x 16 floats = 576 = C + R at most
constexpr int kLatentFloat4s = 8;                   // 8 x 16 x 4 = 512 = C at most

struct DecodeArgs {
  const float* qcat = nullptr;          // [B, rows, row]
  const float* pool = nullptr;          // [num_blocks, block_size, row]
  const int32_t* block_tables = nullptr;  // [B, table_stride]
  const int32_t* lengths = nullptr;     // [B], after the T new tokens
  float* split_out = nullptr;           // [B, splits, rows, C]
  float* split_lse = nullptr;           // [B, splits, rows]
  int64_t table_stride = 0;
  int rows = 0, new_tokens = 0, kv_rank = 0, row = 0, block_size = 0, blocks_per_split = 0, splits = 0;
  float scale = 0.0f;
};

// Issues the copies of tokens [t0, t0 + kDecodeTileTokens) of the split (those < end) into
// tile [kDecodeTileTokens, row] with cp.async; tokens past end are zeroed (their scores are
// masked, and 0 * V must stay finite).
__device__ inline void issue_decode_tile(float* tile, const DecodeArgs& a, const int32_t* table, int t0, int end) {
  const int row4 = a.row / 4;
  for (int i = threadIdx.x; i < kDecodeTileTokens * row4; i += blockDim.x) {
    const int j = i / row4, c4 = i % row4, t = t0 + j;
    float4* dst = reinterpret_cast<float4*>(tile + j * a.row) + c4;
    if (t < end) {
      const int64_t slot = static_cast<int64_t>(table[t / a.block_size]) * a.block_size + t % a.block_size;
      __pipeline_memcpy_async(dst, reinterpret_cast<const float4*>(a.pool + slot * a.row) + c4, sizeof(float4));
    } else {
      *dst = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
  __pipeline_commit();
}

__device__ inline float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

// Grid (splits, ceil(rows / kDecodeRows), B). Lane l16 of a half-warp owns the float4s
// l16 + 16 i of its row (q, and for i < 8 the output columns), so a half-warp reads 256
// contiguous bytes of a cached token and both half-warps read the same token (broadcast).
// After the dot products lane l16 keeps the score of tile token l16 only.
__global__ void __launch_bounds__(kDecodeThreads, 2) decode_split_kernel(DecodeArgs a) {
  extern __shared__ float4 decode_smem[];
  const auto buffer = [&](int i) { return reinterpret_cast<float*>(decode_smem) + (i & 1) * kDecodeTileTokens * a.row; };
  const int split = blockIdx.x, b = blockIdx.z, lane = threadIdx.x % 32;
  const int r = blockIdx.y * kDecodeRows + threadIdx.x / 16, l16 = threadIdx.x % 16;
  const bool active = r < a.rows;
  const int length = a.lengths[b];
  const int begin = split * a.blocks_per_split * a.block_size;
  const int end = min(length, begin + a.blocks_per_split * a.block_size);
  // Row r = h * T + j is new token j: it sees the cache up to its own position.
  const int visible = length - a.new_tokens + (r % a.new_tokens) + 1;
  const int32_t* table = a.block_tables + b * a.table_stride;
  float4 q[kRowFloat4s];
  const float4* q_row = reinterpret_cast<const float4*>(a.qcat + (static_cast<int64_t>(b) * a.rows + r) * a.row);
#pragma unroll
  for (int i = 0; i < kRowFloat4s; ++i) {
    const int c4 = l16 + 16 * i;
    q[i] = (active && 4 * c4 < a.row) ? q_row[c4] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  float4 acc[kLatentFloat4s];
#pragma unroll
  for (int i = 0; i < kLatentFloat4s; ++i) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float m = -INFINITY, l = 0.0f;
  const int tiles = end > begin ? (end - begin + kDecodeTileTokens - 1) / kDecodeTileTokens : 0;
  if (tiles > 0) issue_decode_tile(buffer(0), a, table, begin, end);
  for (int it = 0; it < tiles; ++it) {
    // Always commit a group (possibly empty) so wait_prior(1) means "tile it has landed".
    if (it + 1 < tiles) {
      issue_decode_tile(buffer(it + 1), a, table, begin + (it + 1) * kDecodeTileTokens, end);
    } else {
      __pipeline_commit();
    }
    __pipeline_wait_prior(1);
    __syncthreads();
    const float* tile = buffer(it);
    const int t0 = begin + it * kDecodeTileTokens;
    float score = 0.0f;
#pragma unroll
    for (int j = 0; j < kDecodeTileTokens; ++j) {
      const float4* key = reinterpret_cast<const float4*>(tile + j * a.row);
      float part = 0.0f;
#pragma unroll
      for (int i = 0; i < kRowFloat4s; ++i) {
        const int c4 = l16 + 16 * i;
        if (4 * c4 < a.row) part = dot4(q[i], key[c4], part);
      }
      for (int o = 8; o > 0; o >>= 1) part += __shfl_xor_sync(kFullMask, part, o);  // within the half-warp
      if (j == l16) score = part;
    }
    score = t0 + l16 < min(visible, end) ? score * a.scale : -INFINITY;
    float tile_max = score;
    for (int o = 8; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, o));
    const float m_new = fmaxf(m, tile_max);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // nothing visible yet: keep exp() finite
    const float alpha = expf(m - m_use), my_p = expf(score - m_use);
    float p_sum = my_p;
    for (int o = 8; o > 0; o >>= 1) p_sum += __shfl_xor_sync(kFullMask, p_sum, o);
    l = l * alpha + p_sum;
#pragma unroll
    for (int i = 0; i < kLatentFloat4s; ++i) {
      acc[i].x *= alpha;
      acc[i].y *= alpha;
      acc[i].z *= alpha;
      acc[i].w *= alpha;
    }
#pragma unroll
    for (int j = 0; j < kDecodeTileTokens; ++j) {
      const float p = __shfl_sync(kFullMask, my_p, (lane & 16) + j);  // token j's weight, from lane j of this half
      const float4* value = reinterpret_cast<const float4*>(tile + j * a.row);
#pragma unroll
      for (int i = 0; i < kLatentFloat4s; ++i) {
        const int c4 = l16 + 16 * i;
        if (4 * c4 < a.kv_rank) {
          const float4 v = value[c4];
          acc[i].x = fmaf(p, v.x, acc[i].x);
          acc[i].y = fmaf(p, v.y, acc[i].y);
          acc[i].z = fmaf(p, v.z, acc[i].z);
          acc[i].w = fmaf(p, v.w, acc[i].w);
        }
      }
    }
    m = m_new;
    __syncthreads();  // tile it & 1 is refilled by the next iteration's issue
  }
  if (!active) return;
  const int64_t at = (static_cast<int64_t>(b) * a.splits + split) * a.rows + r;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  float4* out = reinterpret_cast<float4*>(a.split_out + at * a.kv_rank);
#pragma unroll
  for (int i = 0; i < kLatentFloat4s; ++i) {
    const int c4 = l16 + 16 * i;
    if (4 * c4 < a.kv_rank) out[c4] = make_float4(acc[i].x * inv, acc[i].y * inv, acc[i].z * inv, acc[i].w * inv);
  }
  if (l16 == 0) a.split_lse[at] = l > 0.0f ? m + logf(l) : -INFINITY;
}

// o_lat[b, r] = sum_s w_s o_split[b, s, r] / sum_s w_s with w_s = exp(lse_s - max lse), in
// split order. Grid B * rows; the weights go through shared memory [splits].
__global__ void decode_combine_kernel(const float* split_out, const float* split_lse, float* olat, int rows, int splits,
                                      int kv_rank) {
  extern __shared__ float combine_weights[];
  const int64_t br = blockIdx.x, b = br / rows, r = br % rows;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) combine_weights[s] = split_lse[(b * splits + s) * rows + r];
  __syncthreads();
  float top = -INFINITY;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, combine_weights[s]);
  __syncthreads();
  for (int s = threadIdx.x; s < splits; s += blockDim.x)
    combine_weights[s] = top == -INFINITY ? 0.0f : expf(combine_weights[s] - top);
  __syncthreads();
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += combine_weights[s];
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int c4 = threadIdx.x; c4 < kv_rank / 4; c4 += blockDim.x) {
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s = 0; s < splits; ++s) {
      const float w = combine_weights[s];
      if (w == 0.0f) continue;
      const float4 v = reinterpret_cast<const float4*>(split_out + ((b * splits + s) * rows + r) * kv_rank)[c4];
      o.x = fmaf(w, v.x, o.x);
      o.y = fmaf(w, v.y, o.y);
      o.z = fmaf(w, v.z, o.z);
      o.w = fmaf(w, v.w, o.w);
    }
    reinterpret_cast<float4*>(olat + br * kv_rank)[c4] = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
  }
}

// Row (b, j) of head h of a [B, T, H, K]-like operand: data[b * batch + j * token + h * head + k].
struct RowsByHead {
  float* data = nullptr;
  int64_t batch = 0, token = 0, head = 0;
  __device__ float* row(int64_t bj, int64_t h, int T) const { return data + (bj / T) * batch + (bj % T) * token + h * head; }
};

// out(bj, h, :cols) = a(bj, h, :K) M_h for the B*T rows bj and every head h, where
// M_h(k, col) = m[h * m_head + k * m_k + col * m_col]. Grid (ceil(cols / 128), H), 128 threads:
// a thread owns one column, kMatmulRows rows at a time with those rows of a in shared memory.
constexpr int kMatmulThreads = 128;
constexpr int kMatmulRows = 8;

__global__ void __launch_bounds__(kMatmulThreads) head_matmul_kernel(RowsByHead a, const float* m, int64_t m_head,
                                                                       int64_t m_k, int64_t m_col, RowsByHead out,
                                                                       int64_t rows, int T, int K, int cols) {
  extern __shared__ float a_rows[];  // [kMatmulRows, K]
  const int h = blockIdx.y, col = blockIdx.x * kMatmulThreads + threadIdx.x;
  for (int64_t r0 = 0; r0 < rows; r0 += kMatmulRows) {
    __syncthreads();
    for (int i = threadIdx.x; i < kMatmulRows * K; i += kMatmulThreads) {
      const int64_t bj = r0 + i / K;
      a_rows[i] = bj < rows ? a.row(bj, h, T)[i % K] : 0.0f;
    }
    __syncthreads();
    if (col >= cols) continue;
    const float* mh = m + h * m_head + static_cast<int64_t>(col) * m_col;
    float acc[kMatmulRows] = {};
    for (int k = 0; k < K; ++k) {
      const float w = mh[k * m_k];
#pragma unroll
      for (int r = 0; r < kMatmulRows; ++r) acc[r] = fmaf(a_rows[r * K + k], w, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < kMatmulRows; ++r)
      if (r0 + r < rows) out.row(r0 + r, h, T)[col] = acc[r];
  }
}

// qcat(bj, h)[C:C+R] = q_pe(bj, h).
__global__ void copy_q_pe_kernel(RowsByHead q_pe, RowsByHead qcat_pe, int64_t rows, int H, int T, int R) {
  const int64_t n = rows * H * R;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bj = i / (static_cast<int64_t>(H) * R), h = (i / R) % H, d = i % R;
    qcat_pe.row(bj, h, T)[d] = q_pe.row(bj, h, T)[d];
  }
}

}  // namespace mla_cuda

// ---------------------------------------------------------------------------------------
template <>
struct MlaImpl<Cuda> {
  template <class T>
  static constexpr void require_float() {
    static_assert(std::is_same_v<T, float>, "r1/cuda/mla.cuh: MlaImpl<Cuda> runs fp32 params and caches");
  }

  // dst = src for two [rows, cols] views with unit column stride (rows may be strided).
  template <class T>
  static void copy_rows(ConstView<T, Cuda> src, View<T, Cuda> dst) {
    R1_CHECK(src.rank() == 2 && src.shape() == dst.shape(), "[mla.copy_rows] src has shape ", src.shape(), ", dst has ",
             dst.shape(), ", expected equal 2-d shapes");
    R1_CHECK(src.strides()[1] == 1 && dst.strides()[1] == 1, "[mla.copy_rows] columns must be contiguous");
    const int64_t rows = src.size(0), cols = src.size(1);
    if (rows == 0 || cols == 0) return;
    const auto pitch = [](int64_t stride) { return static_cast<std::size_t>(stride) * sizeof(T); };
    R1_CUDA_CHECK(cudaMemcpy2DAsync(dst.data(), pitch(rows > 1 ? dst.strides()[0] : cols), src.data(),
                                    pitch(rows > 1 ? src.strides()[0] : cols), static_cast<std::size_t>(cols) * sizeof(T),
                                    static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, cuda_stream()),
                  "mla.copy_rows");
  }

  // dst += src, same shapes, both contiguous.
  template <class T>
  static void add(ConstView<T, Cuda> src, View<T, Cuda> dst) {
    require_float<T>();
    R1_CHECK(src.shape() == dst.shape(), "[mla.add] src has shape ", src.shape(), ", dst has ", dst.shape());
    R1_CHECK(src.is_contiguous() && dst.is_contiguous(), "[mla.add] needs contiguous views");
    const int64_t n = src.numel();
    mla_cuda::add_kernel<<<cuda_blocks(n), 256, 0, cuda_stream()>>>(src.data(), dst.data(), n);
    R1_CUDA_CHECK_LAUNCH("mla.add");
  }

  // ---- training path -------------------------------------------------------------------

  // The attention operands of the training path, read and written in place in the cache.
  struct TrainingOperands {
    mla_cuda::FlashShape shape;
    mla_cuda::HeadTensor<const float> q, k, v, out, dout;
    mla_cuda::HeadTensor<float> o, dq, dk, dv;
  };

  template <class T>
  static TrainingOperands training_operands(const Mla<T, Cuda>& p, MlaCache<T, Cuda>& c, const char* op) {
    const auto& cf = p.config;
    const int64_t B = c.batch, S = c.seq, H = cf.num_attention_heads, N = cf.qk_nope_head_dim, R = cf.qk_rope_head_dim,
                  V = cf.v_head_dim, Dq = N + R, Dkv = N + V;
    R1_CHECK(Dq <= 256 && V <= 256, "[", op, "] head dims ", Dq, " (q, k) and ", V, " (v) must be at most 256");
    R1_CHECK(S <= (int64_t{1} << 30) && B <= 65535 && H <= 65535, "[", op, "] batch ", B, ", heads ", H, " or sequence ", S,
             " too large for one launch");
    TrainingOperands t;
    t.shape.B = static_cast<int>(B);
    t.shape.S = static_cast<int>(S);
    t.shape.H = static_cast<int>(H);
    t.shape.dq = static_cast<int>(Dq);
    t.shape.dv = static_cast<int>(V);
    t.shape.pitch_qk = mla_cuda::tile_pitch(Dq);
    t.shape.pitch_v = mla_cuda::tile_pitch(V);
    t.shape.scale = static_cast<float>(p.softmax_scale());
    using mla_cuda::head_tensor;
    const float* kv = c.kv_b.y.data();
    t.q = head_tensor<const float>(c.q_rot.data(), S, H * Dq, Dq, Dq);
    t.k = head_tensor<const float>(kv, S, H * Dkv, Dkv, N);
    t.k.hi = c.k_pe.data();  // k_pe: one head for all
    t.k.hi_batch = S * R;
    t.k.hi_token = R;
    t.k.dim = static_cast<int>(Dq);
    t.v = head_tensor<const float>(kv + N, S, H * Dkv, Dkv, V);
    t.o = head_tensor<float>(c.attn.data(), S, H * V, V, V);
    t.out = head_tensor<const float>(c.attn.data(), S, H * V, V, V);
    t.dout = head_tensor<const float>(c.o.dx.data(), S, H * V, V, V);
    t.dq = head_tensor<float>(c.dq.data(), S, H * Dq, Dq, Dq);
    t.dk = head_tensor<float>(c.dkv.data(), S, H * Dkv, Dkv, N);
    t.dk.hi = c.dkh.data();  // [B, S, H, R]: each head's dk_pe, summed afterwards
    t.dk.hi_batch = S * H * R;
    t.dk.hi_token = H * R;
    t.dk.hi_head = R;
    t.dk.dim = static_cast<int>(Dq);
    t.dv = head_tensor<float>(c.dkv.data() + N, S, H * Dkv, Dkv, V);
    return t;
  }

  // Reads c.q_rot, c.kv_b.y, c.k_pe; writes c.attn and c.lse.
  template <class T>
  static void attention_forward(const Mla<T, Cuda>& p, MlaCache<T, Cuda>& c) {
    require_float<T>();
    const TrainingOperands t = training_operands(p, c, "mla.attention_forward");
    const auto& sh = t.shape;
    c.lse.resize(Shape{c.batch, p.config.num_attention_heads, c.seq});
    if (c.seq == 0 || c.batch == 0) return;
    const std::size_t smem = sizeof(float) * mla_cuda::kTile * (2 * sh.pitch_qk + sh.pitch_v);
    const dim3 grid(static_cast<unsigned>(sh.tiles()), static_cast<unsigned>(sh.H), static_cast<unsigned>(sh.B));
    mla_cuda::with_column_slots(sh.dv, [&](auto v_slots) {
      const auto kernel = mla_cuda::flash_forward_kernel<decltype(v_slots)::value>;
      mla_cuda::reserve_shared_memory(kernel, smem, "mla.attention_forward");
      kernel<<<grid, mla_cuda::kFlashThreads, smem, cuda_stream()>>>(sh, t.q, t.k, t.v, t.o, c.lse.data());
      R1_CUDA_CHECK_LAUNCH("mla.attention_forward");
    });
  }

  // From dO (c.o.dx) and the forward's c.attn, c.lse to c.dq [B*S, H, Dq], c.dkv [B, S, H*(N+V)]
  // and c.dk_pe [B*S, R].
  template <class T>
  static void attention_backward(const Mla<T, Cuda>& p, MlaCache<T, Cuda>& c) {
    require_float<T>();
    R1_CHECK(c.lse.numel() == c.batch * p.config.num_attention_heads * c.seq,
             "[mla.attention_backward] the cache holds no attention forward: call forward first");
    const int64_t R = p.config.qk_rope_head_dim;
    c.dkh.resize(Shape{c.batch, c.seq, p.config.num_attention_heads, R});
    c.delta.resize(c.lse.shape());
    const TrainingOperands t = training_operands(p, c, "mla.attention_backward");
    const auto& sh = t.shape;
    if (c.seq == 0 || c.batch == 0) return;
    const int64_t rows = c.lse.numel();
    mla_cuda::flash_delta_kernel<<<cuda_blocks(rows * 32), 256, 0, cuda_stream()>>>(sh, t.dout, t.out, c.delta.data());
    R1_CUDA_CHECK_LAUNCH("mla.attention_backward");
    const std::size_t smem = sizeof(float) * mla_cuda::kTile * (2 * sh.pitch_qk + 2 * sh.pitch_v);
    const dim3 grid(static_cast<unsigned>(sh.tiles()), static_cast<unsigned>(sh.H), static_cast<unsigned>(sh.B));
    mla_cuda::with_column_slots(sh.dq, [&](auto q_slots) {
      const auto dq_kernel = mla_cuda::flash_dq_kernel<decltype(q_slots)::value>;
      mla_cuda::reserve_shared_memory(dq_kernel, smem, "mla.attention_backward");
      dq_kernel<<<grid, mla_cuda::kFlashThreads, smem, cuda_stream()>>>(sh, t.q, t.k, t.v, t.dout, c.lse.data(),
                                                                         c.delta.data(), t.dq);
      R1_CUDA_CHECK_LAUNCH("mla.attention_backward");
      mla_cuda::with_column_slots(sh.dv, [&](auto v_slots) {
        const auto dkdv_kernel = mla_cuda::flash_dkdv_kernel<decltype(q_slots)::value, decltype(v_slots)::value>;
        mla_cuda::reserve_shared_memory(dkdv_kernel, smem, "mla.attention_backward");
        dkdv_kernel<<<grid, mla_cuda::kFlashThreads, smem, cuda_stream()>>>(sh, t.q, t.k, t.v, t.dout, c.lse.data(),
                                                                             c.delta.data(), t.dk, t.dv);
        R1_CUDA_CHECK_LAUNCH("mla.attention_backward");
      });
    });
    const int64_t tokens = c.batch * c.seq;
    mla_cuda::sum_heads_kernel<<<cuda_blocks(tokens * R), 256, 0, cuda_stream()>>>(c.dkh.data(), c.dk_pe.data(), tokens,
                                                                                     sh.H, static_cast<int>(R));
    R1_CUDA_CHECK_LAUNCH("mla.attention_backward");
  }

  // ---- absorbed decode -----------------------------------------------------------------

  // Uploads the block tables [B, max blocks] and lengths [B] of seqs to w.block_tables and
  // w.lengths, for latent_attention.
  template <class T>
  static void stage_block_tables(const MlaKvCache<T, Cuda>& kv, const std::vector<int64_t>& seqs, MlaDecodeCache<T, Cuda>& w) {
    const int64_t B = static_cast<int64_t>(seqs.size());
    int64_t width = 1;
    for (int64_t seq : seqs) width = std::max(width, kv.num_blocks_of(seq));
    std::vector<int32_t> tables(static_cast<std::size_t>(B * width), 0), lengths(static_cast<std::size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t length = kv.length(seqs[b]);
      R1_CHECK(length <= (int64_t{1} << 30), "[mla.stage_block_tables] sequence ", seqs[b], " has ", length, " tokens");
      const auto& table = kv.block_table(seqs[b]);
      std::copy(table.begin(), table.begin() + kv.num_blocks_of(seqs[b]), tables.begin() + b * width);
      lengths[static_cast<std::size_t>(b)] = static_cast<int32_t>(length);
    }
    w.block_tables.resize(Shape{B, width});
    w.lengths.resize(Shape{B});
    // Pageable sources: the copies are staged before the calls return, so the vectors may go.
    R1_CUDA_CHECK(cudaMemcpyAsync(w.block_tables.data(), tables.data(), tables.size() * sizeof(int32_t),
                                  cudaMemcpyHostToDevice, cuda_stream()),
                  "mla.stage_block_tables");
    R1_CUDA_CHECK(cudaMemcpyAsync(w.lengths.data(), lengths.data(), lengths.size() * sizeof(int32_t), cudaMemcpyHostToDevice,
                                  cuda_stream()),
                  "mla.stage_block_tables");
  }

  // The decode core: w.qcat [B, H*T, C+R] (queries in latent space) against the staged
  // sequences of kv -> w.olat [B, H*T, C]. Every sequence holds at least T tokens, its last T
  // being the new ones (row h*T + j sees the cache up to new token j).
  template <class T>
  static void latent_attention(const MlaKvCache<T, Cuda>& kv, int64_t H, int64_t Tn, double scale, MlaDecodeCache<T, Cuda>& w) {
    require_float<T>();
    const int64_t B = w.lengths.numel(), C = kv.kv_lora_rank(), R = kv.rope_dim(), row = C + R, rows = H * Tn;
    R1_CHECK(C % 4 == 0 && R % 4 == 0 && C <= 4 * 16 * mla_cuda::kLatentFloat4s && row <= 4 * 16 * mla_cuda::kRowFloat4s,
             "[mla.latent_attention] kv_lora_rank ", C, " and qk_rope_head_dim ", R,
             " must be multiples of 4 with kv_lora_rank <= 512 and their sum <= 576");
    R1_CHECK(Tn > 0 && H > 0, "[mla.latent_attention] ", H, " heads and ", Tn, " new tokens, expected positive counts");
    R1_CHECK(w.qcat.shape() == (Shape{B, rows, row}), "[mla.latent_attention] qcat has shape ", w.qcat.shape(), ", expected [",
             B, ", ", rows, ", ", row, "]");
    w.olat.resize(Shape{B, rows, C});
    if (B == 0) return;
    const int64_t width = w.block_tables.size(1), groups = (rows + mla_cuda::kDecodeRows - 1) / mla_cuda::kDecodeRows;
    R1_CHECK(B <= 65535 && groups <= 65535, "[mla.latent_attention] batch ", B, " or ", rows, " query rows too large for one launch");
    // Enough splits of whole blocks for about two CTAs per SM, none empty for the longest sequence.
    const int64_t wanted = (2 * mla_cuda::multiprocessor_count("mla.latent_attention") + B * groups - 1) / (B * groups);
    const int64_t target = std::clamp<int64_t>(wanted, 1, width), per_split = (width + target - 1) / target;
    const int64_t splits = (width + per_split - 1) / per_split;
    w.acc.resize(Shape{B, splits, rows, C});
    w.split_lse.resize(Shape{B, splits, rows});
    mla_cuda::DecodeArgs a;
    a.qcat = w.qcat.data();
    a.pool = kv.pool().data();
    a.block_tables = w.block_tables.data();
    a.lengths = w.lengths.data();
    a.split_out = w.acc.data();
    a.split_lse = w.split_lse.data();
    a.table_stride = width;
    a.rows = static_cast<int>(rows);
    a.new_tokens = static_cast<int>(Tn);
    a.kv_rank = static_cast<int>(C);
    a.row = static_cast<int>(row);
    a.block_size = static_cast<int>(kv.block_size());
    a.blocks_per_split = static_cast<int>(per_split);
    a.splits = static_cast<int>(splits);
    a.scale = static_cast<float>(scale);
    const std::size_t smem = 2 * sizeof(float) * mla_cuda::kDecodeTileTokens * row;
    mla_cuda::reserve_shared_memory(mla_cuda::decode_split_kernel, smem, "mla.latent_attention");
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(groups), static_cast<unsigned>(B));
    mla_cuda::decode_split_kernel<<<grid, mla_cuda::kDecodeThreads, smem, cuda_stream()>>>(a);
    R1_CUDA_CHECK_LAUNCH("mla.latent_attention");
    const std::size_t combine_smem = sizeof(float) * static_cast<std::size_t>(splits);
    mla_cuda::decode_combine_kernel<<<static_cast<unsigned>(B * rows), 128, combine_smem, cuda_stream()>>>(
        w.acc.data(), w.split_lse.data(), w.olat.data(), static_cast<int>(rows), static_cast<int>(splits), static_cast<int>(C));
    R1_CUDA_CHECK_LAUNCH("mla.latent_attention");
  }

  // Absorbed attention of forward_absorbed, for the B sequences seqs after their T new
  // tokens were appended: w.q [B*T, H, Dq] (RoPE'd) -> w.attn [B, T, H*V].
  template <class T>
  static void absorbed_attention(const Mla<T, Cuda>& p, const MlaKvCache<T, Cuda>& kv, const std::vector<int64_t>& seqs,
                                 int64_t Tn, MlaDecodeCache<T, Cuda>& w) {
    require_float<T>();
    const auto& cf = p.config;
    const int64_t B = static_cast<int64_t>(seqs.size()), H = cf.num_attention_heads, N = cf.qk_nope_head_dim,
                  R = cf.qk_rope_head_dim, V = cf.v_head_dim, C = cf.kv_lora_rank, Dq = N + R, Dkv = N + V, row = C + R,
                  rows = H * Tn, bt = B * Tn;
    R1_CHECK(H <= 65535, "[mla.absorbed_attention] ", H, " heads, at most 65535 in one launch");
    w.qcat.resize(Shape{B, rows, row});
    if (B == 0) return;
    stage_block_tables(kv, seqs, w);
    using mla_cuda::RowsByHead;
    const float* wkv = p.kv_b.weight.data();
    // qcat[b, h*T + j] = [q_nope[b, j, h] W_UK[h] | q_pe[b, j, h]]
    const RowsByHead q{w.q.data(), Tn * H * Dq, H * Dq, Dq};
    const RowsByHead qcat{w.qcat.data(), rows * row, row, Tn * row};
    launch_head_matmul(q, wkv, Dkv * C, C, 1, qcat, bt, Tn, N, C, H);
    mla_cuda::copy_q_pe_kernel<<<cuda_blocks(bt * H * R), 256, 0, cuda_stream()>>>(
        RowsByHead{w.q.data() + N, Tn * H * Dq, H * Dq, Dq}, RowsByHead{w.qcat.data() + C, rows * row, row, Tn * row}, bt,
        static_cast<int>(H), static_cast<int>(Tn), static_cast<int>(R));
    R1_CUDA_CHECK_LAUNCH("mla.absorbed_attention");
    latent_attention(kv, H, Tn, p.softmax_scale(), w);
    // attn[b, j, h*V + v] = o_lat[b, h*T + j] . W_UV[h][v]
    const RowsByHead olat{w.olat.data(), rows * C, C, Tn * C};
    const RowsByHead attn{w.attn.data(), Tn * H * V, H * V, V};
    launch_head_matmul(olat, wkv + N * C, Dkv * C, 1, C, attn, bt, Tn, C, V, H);
  }

 private:
  static void launch_head_matmul(mla_cuda::RowsByHead a, const float* m, int64_t m_head, int64_t m_k, int64_t m_col,
                                 mla_cuda::RowsByHead out, int64_t rows, int64_t Tn, int64_t K, int64_t cols, int64_t H) {
    const std::size_t smem = sizeof(float) * mla_cuda::kMatmulRows * static_cast<std::size_t>(K);
    mla_cuda::reserve_shared_memory(mla_cuda::head_matmul_kernel, smem, "mla.absorbed_attention");
    const dim3 grid(static_cast<unsigned>((cols + mla_cuda::kMatmulThreads - 1) / mla_cuda::kMatmulThreads),
                    static_cast<unsigned>(H));
    mla_cuda::head_matmul_kernel<<<grid, mla_cuda::kMatmulThreads, smem, cuda_stream()>>>(
        a, m, m_head, m_k, m_col, out, rows, static_cast<int>(Tn), static_cast<int>(K), static_cast<int>(cols));
    R1_CUDA_CHECK_LAUNCH("mla.absorbed_attention");
  }
};

}  // namespace r1
