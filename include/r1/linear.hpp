// r1/linear.hpp: the affine layer, y = x W^T + b.
//
//   forward:   y[M,N]  = x[M,K] W[N,K]^T + b[N]
//   backward:  dx[M,K] = dy[M,N] W[N,K]
//              dW[N,K] += dy^T x,  db[N] += sum over rows of dy
//
// Legend: M rows (tokens: any leading dims of x are flattened into M), K in_features,
// N out_features. W keeps PyTorch's and HF's [out, in] layout, so a checkpoint tensor maps
// onto it without a transpose.
//
// The products go through r1::gemm below, which every component uses for its matrix
// products. bench/bench_gemm and the README's Benchmarks section measure it.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "parallel.hpp"
#include "simd.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace r1 {

// ---------------------------------------------------------------------------------------
// C = A B, or C += A B with accumulate, for Eigen expressions on the host (maps, their
// transposes, blocks); C is row-major, as every r1 matrix is. Three paths:
//
// - float, AVX-512, operands with direct access (the usual case): r1's own SGEMM
//   (simd::sgemm_block in simd.hpp). C is split into bands of rows (or of 64-column panels
//   when C is wide) across r1's threads. Each element is one running sum over k in order,
//   computed by one thread, so results are bit-identical for any thread count. Two shapes
//   go elsewhere: C = A W^T with at most 16 rows (a few tokens through a layer) runs on
//   simd.hpp's lane product, reading W unpacked; and a single row, or an inner dimension
//   of 1, stays with Eigen's matrix-vector and outer-product kernels, which stream at
//   memory speed.
// - anything else (double, other targets, expressions without direct access): Eigen's
//   product, in bands the same way. Single-threaded, Eigen blocks the inner dimension by
//   its length alone, and its micro-kernels sum each element in an order fixed by the
//   element's place in a register block (Eigen computes a row-major C as C^T = B^T A^T,
//   whose row blocks are mr = 3 SIMD packets of C's columns, and column blocks nr = 4 of
//   C's rows; the tail rows use other kernels). So bands start at multiples of mr columns,
//   or of 16 rows, and only the last band holds the tail: again the same bits for any
//   thread count. Eigen's own threading re-blocks by thread count and gives no such
//   guarantee. A product with inner dimension 1 (a single token's dW = dy^T x) is a plain
//   outer product there: Eigen's GEMM would spend its time packing.
// - with R1_USE_OPENBLAS every product goes to OpenBLAS (EIGEN_USE_BLAS), which threads
//   itself and is not bit-identical across thread counts.
#if R1_SIMD_SGEMM
namespace detail {

template <class E>
inline constexpr bool is_direct_float =
    std::is_same_v<typename E::Scalar, float> && (static_cast<unsigned>(E::Flags) & Eigen::DirectAccessBit) != 0;

// An Eigen expression with direct access as (pointer, rows, cols, row stride, col stride).
template <class E>
simd::StridedMatrix strided(const E& e) {
  const int64_t inner = e.innerStride(), outer = e.outerStride();
  return {e.data(), e.rows(), e.cols(), E::IsRowMajor ? outer : inner, E::IsRowMajor ? inner : outer};
}

// C = A W^T with A [M <= 16, K] and W [N, K] both row-major: a few tokens through a layer
// (batched decode). A's rows go into register lanes and W is read straight from memory,
// row by row, with no packing: the SGEMM would transpose all of W for a handful of rows.
// Threads take bands of W's rows.
inline void few_rows_times_transposed(const simd::StridedMatrix& a, const simd::StridedMatrix& w_t, float* c,
                                      int64_t ldc) {
  const int64_t M = a.rows, N = w_t.cols, K = a.cols, lda = a.row_stride, ldw = w_t.col_stride;
  constexpr int64_t kBand = 256, L = simd::kLanes;
  parallel_for((N + kBand - 1) / kBand, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> panel;
    panel.resize(static_cast<std::size_t>(K * L));
    simd::pack_lanes(a.data, M, K, lda, panel.data());
    alignas(64) float st[kBand * L];
    for (int64_t band = begin; band < end; ++band) {
      const int64_t n0 = band * kBand, n = std::min(kBand, N - n0);
      simd::lanes_abt(panel.data(), w_t.data + n0 * ldw, n, K, ldw, st, band + 1 < end ? w_t.data + (n0 + n) * ldw : nullptr);
      simd::transpose(st, L, n, M, c + n0, ldc);
    }
  }, min_items_per_thread(kBand * K));
}

// The SGEMM path of r1::gemm.
template <class A, class B, class C>
void sgemm(const A& a, const B& b, C& c, bool accumulate) {
  const simd::StridedMatrix sa = strided(a), sb = strided(b);
  float* const out = c.data();
  const int64_t M = c.rows(), N = c.cols(), ldc = c.outerStride();
  if (M <= simd::kLanes && !accumulate && sa.col_stride == 1 && sb.row_stride == 1) {
    few_rows_times_transposed(sa, sb, out, ldc);
    return;
  }
  const bool split_rows = M >= N;
  const int64_t band = split_rows ? simd::detail::kMr : simd::detail::kNr;
  const int64_t length = split_rows ? M : N;
  const int64_t bands = std::max<int64_t>(1, (length + band - 1) / band);
  const int64_t madds_per_band = band * (split_rows ? N : M) * std::max<int64_t>(a.cols(), 1);
  parallel_for(bands, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * band, count = std::min(length, end * band) - first;
    if (split_rows) {
      simd::sgemm_block(sa, sb, out, ldc, first, count, 0, N, accumulate);
    } else {
      simd::sgemm_block(sa, sb, out, ldc, 0, M, first, count, accumulate);
    }
  }, min_items_per_thread(madds_per_band));
}

}  // namespace detail
#endif

template <class A, class B, class C>
void gemm(const A& a, const B& b, C&& c, bool accumulate = false) {
  using Dest = std::decay_t<C>;
  static_assert(Dest::IsRowMajor, "r1::gemm: C must be row-major (a View's matrix() or a block of one)");
  R1_CHECK(a.rows() == c.rows() && b.cols() == c.cols() && a.cols() == b.rows(), "[gemm] cannot multiply ", a.rows(), "x",
           a.cols(), " by ", b.rows(), "x", b.cols(), " into ", c.rows(), "x", c.cols());
  const auto product = [accumulate](auto&& c_band, const auto& a_band, const auto& b_band) {
    if (a_band.cols() == 1) {
      if (accumulate) {
        c_band.noalias() += a_band.col(0) * b_band.row(0);
      } else {
        c_band.noalias() = a_band.col(0) * b_band.row(0);
      }
    } else if (accumulate) {
      c_band.noalias() += a_band * b_band;
    } else {
      c_band.noalias() = a_band * b_band;
    }
  };
#if defined(R1_USE_OPENBLAS)
  product(c, a, b);
#else
#if R1_SIMD_SGEMM
  if constexpr (detail::is_direct_float<A> && detail::is_direct_float<B> &&
                detail::is_direct_float<Dest> && (static_cast<unsigned>(Dest::Flags) & Eigen::LvalueBit) != 0) {
    // One row is Eigen's matrix-vector kernel, and an inner dimension of 1 its outer product.
    if (c.innerStride() == 1 && c.rows() > 1 && c.cols() > 0 && a.cols() > 1) {
      detail::sgemm(a, b, c, accumulate);
      return;
    }
  }
#endif
  using Scalar = typename Dest::Scalar;
  const bool split_rows = c.rows() >= c.cols();
  const int64_t band = split_rows ? 16 : Eigen::internal::gebp_traits<Scalar, Scalar>::mr;
  const int64_t length = split_rows ? c.rows() : c.cols();
  const int64_t bands = std::max<int64_t>(1, length / band);  // the last band takes the remainder
  const int64_t madds_per_band = band * (split_rows ? c.cols() : c.rows()) * std::max<int64_t>(a.cols(), 1);
  parallel_for(bands, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * band, count = (end == bands ? length : end * band) - first;
    if (split_rows) {
      product(c.middleRows(first, count), a.middleRows(first, count), b);
    } else {
      product(c.middleCols(first, count), a, b.middleCols(first, count));
    }
  }, min_items_per_thread(madds_per_band));
#endif
}

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct Linear {
  Tensor<T, Dev> weight;  // [out_features, in_features]
  Tensor<T, Dev> bias;    // [out_features], or empty for no bias

  Linear() = default;
  Linear(int64_t in_features, int64_t out_features, bool with_bias = false)
      : weight(checked_shape(in_features, out_features)),
        bias(with_bias ? Tensor<T, Dev>(Shape{out_features}) : Tensor<T, Dev>()) {}

  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }
  bool has_bias() const { return !bias.empty(); }

  template <class F>
  void visit(F&& f) {
    f("weight", weight);
    if (has_bias()) f("bias", bias);
  }

 private:
  static Shape checked_shape(int64_t in_features, int64_t out_features) {
    R1_CHECK(in_features > 0 && out_features > 0, "[linear] in_features ", in_features, " and out_features ", out_features,
             " must be positive");
    return Shape{out_features, in_features};
  }
};

// ---------------------------------------------------------------------------------------
// Cache: what backward needs (a copy of x) and the buffers forward/backward return, reused
// across calls so a training loop stops allocating after its first step.
template <class T, class Dev = Cpu>
struct LinearCache {
  Tensor<T, Dev> x, y, dx;
};

R1_DECLARE_IMPL(LinearImpl, "linear.cuh");

template <>
struct LinearImpl<Cpu> {
  // y = x W^T (+ b); x is [..., in] and y [..., out], leading dims flattened into rows.
  template <class T>
  static void affine(ConstView<T> x, const Linear<T, Cpu>& p, MutableView<T> y) {
    auto y_m = y.matrix();
    gemm(x.matrix(), p.weight.matrix().transpose(), y_m);
    if (p.has_bias()) y_m.rowwise() += p.bias.vector().transpose();
  }

  // dx = dy W, or dx += dy W with accumulate (layers that share an input sum into one dx).
  template <class T>
  static void input_grad(const Linear<T, Cpu>& p, ConstView<T> dy, MutableView<T> dx, bool accumulate) {
    gemm(dy.matrix(), p.weight.matrix(), dx.matrix(), accumulate);
  }

  // dW += dy^T x (and db += the column sums of dy).
  template <class T>
  static void weight_grad(const Linear<T, Cpu>& p, ConstView<T> x, ConstView<T> dy, Linear<T, Cpu>& g) {
    const auto dy_m = dy.matrix();
    gemm(dy_m.transpose(), x.matrix(), g.weight.matrix(), /*accumulate=*/true);
    if (p.has_bias()) g.bias.matrix() += dy_m.colwise().sum();
  }
};

// x[..., in] -> y[..., out]. Leading dims of x carry over to y.
template <class T, class Dev>
const Tensor<T, Dev>& forward(const Linear<T, Dev>& p, ConstView<T, Dev> x, LinearCache<T, Dev>& c) {
  R1_CHECK(p.weight.rank() == 2, "[linear.forward] weight has shape ", p.weight.shape(), ", expected [out, in]");
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) == p.in_features(), "[linear.forward] x has shape ", x.shape(),
           ", expected last dim ", p.in_features());
  R1_CHECK(!p.has_bias() || p.bias.shape() == Shape{p.out_features()}, "[linear.forward] bias has shape ", p.bias.shape(),
           ", expected [", p.out_features(), "]");
  c.x.resize(x.shape());
  copy(x, c.x.view());
  Shape out = x.shape();
  out.dims[out.rank - 1] = p.out_features();
  c.y.resize(out);
  LinearImpl<Dev>::affine(c.x, p, c.y);
  return c.y;
}

// dy[..., out] -> dx[..., in]; accumulates dW (and db) into grads.
template <class T, class Dev>
const Tensor<T, Dev>& backward(const Linear<T, Dev>& p, LinearCache<T, Dev>& c, ConstView<T, Dev> dy, Linear<T, Dev>& grads) {
  R1_CHECK(c.y.data() != nullptr, "[linear.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dy.shape() == c.y.shape(), "[linear.backward] dy has shape ", dy.shape(), ", expected ", c.y.shape(),
           " (the forward output)");
  R1_CHECK(grads.weight.shape() == p.weight.shape() && grads.bias.shape() == p.bias.shape(),
           "[linear.backward] grads have weight ", grads.weight.shape(), " and bias ", grads.bias.shape(), ", expected ",
           p.weight.shape(), " and ", p.bias.shape(), " (use r1::zeros_like(params))");
  c.dx.resize(c.x.shape());
  LinearImpl<Dev>::input_grad(p, dy, c.dx, /*accumulate=*/false);
  LinearImpl<Dev>::weight_grad(p, c.x, dy, grads);
  return c.dx;
}

// Inference without a cache: y = x W^T + b into a caller-owned y.
template <class T, class Dev>
void apply(const Linear<T, Dev>& p, ConstView<T, Dev> x, MutableView<T, Dev> y) {
  Shape out = x.shape();
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) == p.in_features(), "[linear.apply] x has shape ", x.shape(),
           ", expected last dim ", p.in_features());
  out.dims[out.rank - 1] = p.out_features();
  check_shape(y, out, "linear.apply", "y");
  LinearImpl<Dev>::affine(x, p, y);
}

}  // namespace r1
