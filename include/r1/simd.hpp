// r1/simd.hpp: r1's own AVX-512 float kernels, for the products general libraries handle
// poorly here. Two families:
//
// 1. SGEMM (sgemm_block): C[M,N] (+)= A[M,K] B[K,N] for strided A and B, behind r1::gemm
//    (linear.hpp) whenever the scalar is float and the target has AVX-512.
//      register tile   kMr x kNr = 6 rows x 64 columns of C: 24 zmm accumulators; each k
//                      step loads 4 vectors of B and broadcasts 6 values of A
//      packing         B in panels of 64 columns, k-major (bp[k * 64 + c]); A in panels
//                      of 6 rows, row-major (ap[r * kc + k]); zero-padded at the edges,
//                      column tails stored with masks. A with unit column stride (x in
//                      y = x W^T, dy in dx = dy W) is read in place, with its own row
//                      stride; only a tail of fewer than 6 rows is packed. B with unit
//                      column stride, columns in whole vectors and rows at most 4 KiB
//                      apart (W in dx = dy W, x in dW = dy^T x at the MoE's widths) is
//                      read in place too: its packing copy was 7% of an MoE step
//      blocking        K in blocks of kKc = 256, A rows in blocks of kMc, B columns in
//                      blocks of kNc; packing buffers are per thread and allocated once
//    Every element of C is one running sum over k in increasing order (FMA, block after
//    block through C itself), computed by one thread: the result does not depend on how
//    r1::gemm splits C across threads. On this project's Zen 5 machine it runs at 77-100%
//    of the FMA peak on the layer shapes of bench_moe and bench_mla (bench/bench_gemm),
//    against Eigen's 60-70%.
//
// 2. Lane products: one side has at most 16 rows, kept in the 16 lanes of a register.
//    Decode attention is the case: a few query rows (heads x new tokens) against thousands
//    of cached latent rows, where a GEMM's register tiles would be mostly empty.
//
//   A lane panel holds up to 16 rows of a matrix side by side, k-major:
//     panel[k * 16 + l] = A[l, k]            l < 16 lanes, k < K; missing rows are zero
//   lanes_abt:  St[t, l]  = sum_k B[t, k] A[l, k]        S^T = B A^T   (scores of n keys)
//   lanes_atb:  Ot[k, l] (+)= sum_t B[t, k] P[l, t]      O^T = B^T P^T (probabilities x values)
//   with B [n, K] row-major (leading dimension ldb), St and Pt [n, 16], Ot [K, 16].
//
//   Every output element is a fixed sum in k (or t) order (lanes_abt: two running sums,
//   over even and odd k, then added), so the results do not depend on blocking or thread
//   count. Both products read each element of B once and FMA
//   it into all 16 lanes (a broadcast operand), which keeps them at the FMA rate instead
//   of the load rate. lanes_abt reads B straight from memory (a decode step's cache
//   blocks, a layer's weights), so it prefetches the rows its next tile reads, and given
//   `then`, the rows the caller reads next: about 1.4x on rows that come from DRAM.
//
// 3. transpose: a strided float matrix transposed in 16 x 16 register blocks, for packing
//    and for turning the lane products' [K, 16] outputs back into rows.
//
// The register tiles are fully unrolled (`#pragma GCC unroll`, which GCC and Clang honour):
// at -O2 GCC would otherwise keep the accumulator arrays on the stack, at 40% of the FMA
// rate. The lane products have a plain-loop version of the same order for targets without
// AVX-512; the SGEMM does not (R1_SIMD_SGEMM is 0 there and r1::gemm uses Eigen).
#pragma once

#include "config.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace r1::simd {

inline constexpr int kLanes = 16;

// panel[k * 16 + l] = a[l * lda + k] for l < rows, 0 for rows <= l < 16.
inline void pack_lanes(const float* a, int64_t rows, int64_t K, int64_t lda, float* panel) {
  R1_ASSERT(rows >= 0 && rows <= kLanes, "[simd.pack_lanes] ", rows, " rows, at most ", kLanes);
  for (int64_t k = 0; k < K; ++k) {
    float* dst = panel + k * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) dst[l] = l < rows ? a[l * lda + k] : 0.0f;
  }
}

namespace detail {

#if defined(__AVX512F__)
// One 16 x 16 block of transpose below, in registers: unpack, then two rounds of 128-bit
// lane shuffles.
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  const auto lo = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
  const auto hi = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = lo(t[i], t[i + 2]);
    r[i + 1] = hi(t[i], t[i + 2]);
    r[i + 2] = lo(t[i + 1], t[i + 3]);
    r[i + 3] = hi(t[i + 1], t[i + 3]);
  }
#pragma GCC unroll 2
  for (int g = 0; g < 16; g += 8) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[g + i] = _mm512_shuffle_f32x4(r[g + i], r[g + i + 4], 0x88);
      t[g + i + 4] = _mm512_shuffle_f32x4(r[g + i], r[g + i + 4], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

// Tokens t0 .. t0 + Tokens - 1 of St = B A^T. Each token keeps two partial sums, over even
// and odd k, added at the end: twice the independent FMA chains that one sum per token
// would give, so the FMA latency hides behind them with only eight row pointers live.
// Each k pair also prefetches one cache line of `ahead` (the rows the next tile reads):
// K/2 lines are the next eight contiguous rows of K floats. The hardware prefetchers do not
// follow eight row streams at once, and without this the tile waits on memory at 2/3 of
// the rate it reaches on cached rows.
template <int Tokens>
inline void abt_tile(const float* panel, const float* b, int64_t K, int64_t ldb, float* st, const float* ahead) {
  __m512 even[Tokens], odd[Tokens];
#pragma GCC unroll 16
  for (int j = 0; j < Tokens; ++j) even[j] = odd[j] = _mm512_setzero_ps();
  const char* next_line = reinterpret_cast<const char*>(ahead);
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    _mm_prefetch(next_line + k * 32, _MM_HINT_T0);  // line k/2 of `ahead`
    const __m512 a0 = _mm512_loadu_ps(panel + k * kLanes), a1 = _mm512_loadu_ps(panel + (k + 1) * kLanes);
#pragma GCC unroll 16
    for (int j = 0; j < Tokens; ++j) {
      even[j] = _mm512_fmadd_ps(_mm512_set1_ps(b[j * ldb + k]), a0, even[j]);
      odd[j] = _mm512_fmadd_ps(_mm512_set1_ps(b[j * ldb + k + 1]), a1, odd[j]);
    }
  }
  if (k < K) {
    const __m512 a0 = _mm512_loadu_ps(panel + k * kLanes);
#pragma GCC unroll 16
    for (int j = 0; j < Tokens; ++j) even[j] = _mm512_fmadd_ps(_mm512_set1_ps(b[j * ldb + k]), a0, even[j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < Tokens; ++j) _mm512_storeu_ps(st + j * kLanes, _mm512_add_ps(even[j], odd[j]));
}

// Columns k0 .. k0 + Cols - 1 of Ot (+)= B^T P^T.
template <int Cols>
inline void atb_tile(const float* pt, const float* b, int64_t n, int64_t ldb, float* ot, bool accumulate) {
  __m512 acc[Cols];
#pragma GCC unroll 16
  for (int r = 0; r < Cols; ++r) acc[r] = accumulate ? _mm512_loadu_ps(ot + r * kLanes) : _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512 p = _mm512_loadu_ps(pt + t * kLanes);
    const float* row = b + t * ldb;
#pragma GCC unroll 16
    for (int r = 0; r < Cols; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(row[r]), p, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < Cols; ++r) _mm512_storeu_ps(ot + r * kLanes, acc[r]);
}
#else
template <int Tokens>
inline void abt_tile(const float* panel, const float* b, int64_t K, int64_t ldb, float* st, const float* /*ahead*/) {
  float acc[2][Tokens][kLanes] = {};  // even and odd k, as the AVX-512 version
  for (int64_t k = 0; k < K; ++k)
    for (int j = 0; j < Tokens; ++j) {
      const float bk = b[j * ldb + k];
      for (int l = 0; l < kLanes; ++l) acc[k % 2][j][l] = std::fma(bk, panel[k * kLanes + l], acc[k % 2][j][l]);
    }
  for (int j = 0; j < Tokens; ++j)
    for (int l = 0; l < kLanes; ++l) st[j * kLanes + l] = acc[0][j][l] + acc[1][j][l];
}

template <int Cols>
inline void atb_tile(const float* pt, const float* b, int64_t n, int64_t ldb, float* ot, bool accumulate) {
  float acc[Cols][kLanes] = {};
  if (accumulate) std::copy(ot, ot + Cols * kLanes, &acc[0][0]);
  for (int64_t t = 0; t < n; ++t)
    for (int r = 0; r < Cols; ++r) {
      const float bk = b[t * ldb + r];
      for (int l = 0; l < kLanes; ++l) acc[r][l] = std::fma(bk, pt[t * kLanes + l], acc[r][l]);
    }
  std::copy(&acc[0][0], &acc[0][0] + Cols * kLanes, ot);
}
#endif

// Calls f.template operator()<W>() for a compile-time W in {1, 2, 4, 8} covering `remaining`
// (the largest that fits), and returns W: the tails of the tiled loops below.
template <class F>
inline int64_t with_tail_width(int64_t remaining, F&& f) {
  if (remaining >= 8) return f.template operator()<8>(), 8;
  if (remaining >= 4) return f.template operator()<4>(), 4;
  if (remaining >= 2) return f.template operator()<2>(), 2;
  return f.template operator()<1>(), 1;
}

}  // namespace detail

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols: 16 x 16 blocks transposed in
// registers where AVX-512 is there, the edges (and everything elsewhere) one by one.
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
#if defined(__AVX512F__)
  const int64_t full_rows = rows / 16 * 16, full_cols = cols / 16 * 16;
  for (int64_t i = 0; i < full_rows; i += 16)
    for (int64_t j = 0; j < full_cols; j += 16) detail::transpose16(src + i * lds + j, lds, dst + j * ldd + i, ldd);
#else
  const int64_t full_rows = 0, full_cols = 0;
#endif
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = i < full_rows ? full_cols : 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// St[t * 16 + l] = sum_k b[t * ldb + k] * panel[k * 16 + l], t < n. `then` (optional) is
// where the caller reads next, prefetched while the last rows of b are multiplied.
inline void lanes_abt(const float* panel, const float* b, int64_t n, int64_t K, int64_t ldb, float* st,
                      const float* then = nullptr) {
  constexpr int kTile = 8;  // eight B rows: eight row pointers stay in registers (twelve or more spill)
  const auto ahead = [&](int64_t next_row) { return next_row < n ? b + next_row * ldb : then != nullptr ? then : b; };
  int64_t t = 0;
  for (; t + kTile <= n; t += kTile)
    detail::abt_tile<kTile>(panel, b + t * ldb, K, ldb, st + t * kLanes, ahead(t + kTile));
  while (t < n) {
    t += detail::with_tail_width(n - t, [&]<int W>() {
      detail::abt_tile<W>(panel, b + t * ldb, K, ldb, st + t * kLanes, ahead(t + W));
    });
  }
}

// Ot[k * 16 + l] (+)= sum_t b[t * ldb + k] * pt[t * 16 + l], k < K.
inline void lanes_atb(const float* pt, const float* b, int64_t n, int64_t K, int64_t ldb, float* ot, bool accumulate) {
  constexpr int kTile = 16;
  int64_t k = 0;
  for (; k + kTile <= K; k += kTile) detail::atb_tile<kTile>(pt, b + k, n, ldb, ot + k * kLanes, accumulate);
  while (k < K) {
    k += detail::with_tail_width(K - k, [&]<int W>() { detail::atb_tile<W>(pt, b + k, n, ldb, ot + k * kLanes, accumulate); });
  }
}

// ---------------------------------------------------------------------------------------
// SGEMM
#if defined(__AVX512F__)
#define R1_SIMD_SGEMM 1

// A strided float matrix: element (i, j) at data[i * row_stride + j * col_stride].
struct StridedMatrix {
  const float* data;
  int64_t rows, cols, row_stride, col_stride;
};

namespace detail {

inline constexpr int kMr = 6;         // rows of C per register tile
inline constexpr int kNr = 64;        // columns of C per register tile: 4 vectors
inline constexpr int64_t kKc = 256;   // inner-dimension block: fixed, so sums never depend on threads
inline constexpr int64_t kMc = 120;   // rows of A packed at once (20 tiles)
inline constexpr int64_t kNc = 1024;  // columns of B packed at once
// B with unit column stride and rows at most 1024 floats (4 KiB) apart is read in place,
// measured faster than packing there (the MoE's dx and dW products). Farther apart, the
// 256 rows of a K block sit on as many pages, and the TLB misses cost more than packing:
// 12% slower with rows 28 KiB apart (bench_gemm's 2048 x 7168 x 2048 backward).
inline constexpr int64_t kDirectMaxStride = 1024;

struct PackBuffers {
  float* a;
  float* b;
  PackBuffers()
      : a(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kMc * kKc))),
        b(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * kNc * kKc))) {
    R1_CHECK(a != nullptr && b != nullptr, "[simd.sgemm] failed to allocate the packing buffers");
  }
  ~PackBuffers() {
    std::free(a);
    std::free(b);
  }
  PackBuffers(const PackBuffers&) = delete;
  PackBuffers& operator=(const PackBuffers&) = delete;
};

inline PackBuffers& pack_buffers() {
  thread_local PackBuffers buffers;
  return buffers;
}

// Rows [i0, i0 + m) and inner [k0, k0 + kc) of A into panels of kMr rows, row-major:
// panel p holds ap[p * kc + r * kc + k] = A[i0 + p + r, k0 + k], zero past m.
inline void pack_a(const StridedMatrix& a, int64_t i0, int64_t m, int64_t k0, int64_t kc, float* ap) {
  const int64_t padded = (m + kMr - 1) / kMr * kMr;
  const float* src = a.data + i0 * a.row_stride + k0 * a.col_stride;
  if (a.col_stride == 1) {
    for (int64_t r = 0; r < m; ++r) std::copy_n(src + r * a.row_stride, kc, ap + r * kc);
  } else if (a.row_stride == 1) {  // a transposed row-major matrix, as dy^T in dW = dy^T x
    simd::transpose(src, a.col_stride, kc, m, ap, kc);
  } else {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t k = 0; k < kc; ++k) ap[r * kc + k] = src[r * a.row_stride + k * a.col_stride];
  }
  std::fill(ap + m * kc, ap + padded * kc, 0.0f);
}

// Columns [j0, j0 + n) and inner [k0, k0 + kc) of B into panels of kNr columns, k-major:
// panel q holds bp[q * kc * kNr + k * kNr + c] = B[k0 + k, j0 + q*kNr + c], zero past n.
inline void pack_b(const StridedMatrix& b, int64_t k0, int64_t kc, int64_t j0, int64_t n, float* bp) {
  for (int64_t q = 0; q < n; q += kNr) {
    const int64_t cols = std::min<int64_t>(kNr, n - q);
    float* dst = bp + q * kc;
    const float* src = b.data + k0 * b.row_stride + (j0 + q) * b.col_stride;
    if (b.col_stride == 1) {
      for (int64_t k = 0; k < kc; ++k) std::copy_n(src + k * b.row_stride, cols, dst + k * kNr);
    } else if (b.row_stride == 1) {  // a transposed row-major matrix, as W^T in y = x W^T
      simd::transpose(src, b.col_stride, cols, kc, dst, kNr);
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t c = 0; c < cols; ++c) dst[k * kNr + c] = src[k * b.row_stride + c * b.col_stride];
    }
    if (cols < kNr)
      for (int64_t k = 0; k < kc; ++k) std::fill(dst + k * kNr + cols, dst + (k + 1) * kNr, 0.0f);
  }
}

inline __mmask16 tail_mask(int64_t cols) { return cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u); }

// C[rows, cols] (+)= Ap Bp over kc, one register tile; NV vectors cover cols. The first
// k steps prefetch the kMr x 64 block of C at c_next, the tile the caller runs next: C
// there is often cold (a weight gradient accumulated once per step), and with a short kc
// its loads would otherwise stall the tile.
template <int NV>
inline void micro_tile(int64_t kc, const float* ap, int64_t lda, const float* bp, int64_t ldb, float* c, int64_t ldc,
                       int64_t rows, int64_t cols, bool load_c, const float* c_next) {
  __m512 acc[kMr][NV];
  __mmask16 mask[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) mask[v] = tail_mask(cols - 16 * v);
#pragma GCC unroll 6
  for (int r = 0; r < kMr; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = load_c && r < rows ? _mm512_maskz_loadu_ps(mask[v], c + r * ldc + 16 * v) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    if (k < kMr * 4) _mm_prefetch(reinterpret_cast<const char*>(c_next + (k / 4) * ldc + (k % 4) * 16), _MM_HINT_T0);
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(bp + k * ldb + 16 * v);
#pragma GCC unroll 6
    for (int r = 0; r < kMr; ++r) {
      const __m512 a = _mm512_set1_ps(ap[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kMr; ++r) {
    if (r >= rows) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask[v], acc[r][v]);
  }
}

inline void macro_tile(int64_t m, int64_t n, int64_t kc, const float* ap, int64_t lda, const float* bp, bool b_packed,
                       int64_t ldb, float* c, int64_t ldc, bool load_c) {
  for (int64_t q = 0; q < n; q += kNr) {
    const int64_t cols = std::min<int64_t>(kNr, n - q);
    const float* bq = b_packed ? bp + q * kc : bp + q;
    for (int64_t p = 0; p < m; p += kMr) {
      const int64_t rows = std::min<int64_t>(kMr, m - p);
      const float* a = ap + p * lda;
      float* ct = c + p * ldc + q;
      // The next tile down, or the top of the next column panel (prefetches never fault).
      const float* next = p + kMr < m ? ct + kMr * ldc : c + q + kNr;
      switch ((cols + 15) / 16) {
        case 4: micro_tile<4>(kc, a, lda, bq, ldb, ct, ldc, rows, cols, load_c, next); break;
        case 3: micro_tile<3>(kc, a, lda, bq, ldb, ct, ldc, rows, cols, load_c, next); break;
        case 2: micro_tile<2>(kc, a, lda, bq, ldb, ct, ldc, rows, cols, load_c, next); break;
        default: micro_tile<1>(kc, a, lda, bq, ldb, ct, ldc, rows, cols, load_c, next); break;
      }
    }
  }
}

}  // namespace detail

// C[i0:i0+m, j0:j0+n] (+)= A[i0:i0+m, :] B[:, j0:j0+n] on the calling thread; C has row
// stride ldc and unit column stride.
inline void sgemm_block(const StridedMatrix& a, const StridedMatrix& b, float* c, int64_t ldc, int64_t i0, int64_t m,
                        int64_t j0, int64_t n, bool accumulate) {
  using namespace detail;
  const int64_t K = a.cols;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill_n(c + (i0 + i) * ldc + j0, n, 0.0f);
    return;
  }
  PackBuffers& buf = pack_buffers();
  for (int64_t jc = 0; jc < n; jc += kNc) {
    const int64_t nc = std::min(kNc, n - jc);
    const bool b_direct = b.col_stride == 1 && nc % 16 == 0 && b.row_stride <= kDirectMaxStride;
    for (int64_t k0 = 0; k0 < K; k0 += kKc) {
      const int64_t kc = std::min(kKc, K - k0);
      const float* bp = b_direct ? b.data + k0 * b.row_stride + j0 + jc : buf.b;
      const int64_t ldb = b_direct ? b.row_stride : kNr;
      if (!b_direct) pack_b(b, k0, kc, j0 + jc, nc, buf.b);
      for (int64_t ic = 0; ic < m; ic += kMc) {
        const int64_t mc = std::min(kMc, m - ic);
        float* const c_block = c + (i0 + ic) * ldc + j0 + jc;
        const bool load_c = accumulate || k0 > 0;
        // Rows of A with unit stride are register tiles as they stand: only a tail of fewer
        // than kMr rows, which the tile would read past, is packed (with its zero rows).
        const int64_t direct = a.col_stride == 1 ? mc / kMr * kMr : 0;
        if (direct > 0)
          macro_tile(direct, nc, kc, a.data + (i0 + ic) * a.row_stride + k0, a.row_stride, bp, !b_direct, ldb, c_block, ldc, load_c);
        if (direct < mc) {
          pack_a(a, i0 + ic + direct, mc - direct, k0, kc, buf.a);
          macro_tile(mc - direct, nc, kc, buf.a, kc, bp, !b_direct, ldb, c_block + direct * ldc, ldc, load_c);
        }
      }
    }
  }
}

#else
#define R1_SIMD_SGEMM 0
#endif

}  // namespace r1::simd
