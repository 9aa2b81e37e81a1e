// r1/fp8.hpp: FP8 E4M3 block-scaled quantization and GEMM, with DeepSeek-V3's tiles and
// DeepGEMM's accumulation.
//
//   activations  x[M,K]  -> codes[M,K] e4m3, scale[M, KB]:     one scale per row and 128-column tile
//   weights      w[N,K]  -> codes[N,K] e4m3, scale_inv[NB, KB]: one scale per 128x128 block
//   per tile or block:  amax = max(max |x|, 1e-4),  code = e4m3(x * (448 / amax)),  scale = amax / 448
//   so x ~= code * scale. This is DeepGEMM's per_token_cast_to_fp8 / per_block_cast_to_fp8, and
//   how DeepSeek-V3's released weights were made: multiplying by 448 / amax (rather than
//   dividing by the scale) is what they do, and the two can differ in the last bit before the
//   e4m3 rounding. The 1e-4 floor makes an all-zero tile quantize to zeros with a finite scale.
//   e4m3 rounds to nearest even and saturates at 448 (r1::fp8_e4m3).
//
//   GEMM  y[m,n] = sum_kb  partial(m, n, kb) * (a_scale[m,kb] * w_scale_inv[n/128, kb]),
//         partial(m, n, kb) = sum_{k in block kb} code_a[m,k] * code_w[n,k]
//   Each 128-wide K block is summed in fp32 on its own, then "promoted": scaled and added
//   into an fp32 total, total = fma(partial, a_scale * w_scale, total), block after block.
//   This is DeepGEMM's scheme, which DeepSeek-V3 adopted because the tensor cores' FP8
//   accumulator keeps only about 14 bits: promoting every 128 products bounds that loss.
//   Products of two e4m3 values are exact in fp32 (4-bit significands), so the CPU reference
//   differs from the exact sum only by the fp32 rounding of the additions.
//
// Legend: M rows (tokens; leading dims of x are flattened into M), K in_features,
// N out_features, KB = ceil(K/128) K blocks, NB = ceil(N/128) row blocks of the weight.
//
// Provides kFp8BlockSize, fp8_tile_scale_shape / fp8_scale_shape, quantize_fp8_tiles /
// quantize_fp8_blocks (any device), dequantize_fp8_tiles / dequantize_fp8_blocks (host),
// fp8_gemm into float or bf16 (any device), Fp8Linear {weight, weight_scale_inv} with HF
// names, and apply(Fp8Linear, x, y). The CPU path here is the reference that
// r1/cuda/fp8.cuh's kernels match. The CPU path takes any K; the CUDA GEMM needs K to be
// a multiple of 128, as DeepSeek-V3's projections all are. Device functions name their
// device: quantize_fp8_tiles<Cuda>(x, codes, scale); host calls need no template argument.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "numeric.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace r1 {

// DeepSeek-V3's FP8 tiles: 1x128 for activations, 128x128 for weights.
inline constexpr int64_t kFp8BlockSize = 128;

// [ceil(rows/128), ceil(cols/128)]: the shape of the scales of a [rows, cols] FP8 weight.
inline Shape fp8_scale_shape(const Shape& weight) {
  return Shape{(weight[0] + kFp8BlockSize - 1) / kFp8BlockSize, (weight[1] + kFp8BlockSize - 1) / kFp8BlockSize};
}

// [rows, ceil(cols/128)]: the shape of the per-tile scales of [rows, cols] activations.
inline Shape fp8_tile_scale_shape(const Shape& x) { return Shape{x[0], (x[1] + kFp8BlockSize - 1) / kFp8BlockSize}; }

namespace detail {

// The amax floor of DeepGEMM's casts: an all-zero tile gets scale 1e-4 / 448 and zero codes.
inline constexpr float kFp8AmaxFloor = 1e-4f;

template <class T, class Dev>
void check_fp8_matrix(const View<T, Dev>& v, const char* op, const char* name) {
  R1_CHECK(v.rank() == 2, "[", op, "] ", name, " has shape ", v.shape(), ", expected a matrix");
  R1_CHECK(v.is_contiguous(), "[", op, "] ", name, " must be contiguous");
}

// Shapes shared by quantization and dequantization: values [R, C], codes [R, C] and one
// scale per tile of tile_rows x 128 (tile_rows 1 for activations, 128 for weights).
template <class Dev>
void check_fp8_quantized(const Shape& values, ConstView<fp8_e4m3, Dev> codes, ConstView<float, Dev> scale,
                         int64_t tile_rows, const char* op, const char* codes_name = "codes",
                         const char* scale_name = "scale") {
  check_fp8_matrix(codes, op, codes_name);
  check_shape(codes, values, op, codes_name);
  check_fp8_matrix(scale, op, scale_name);
  const Shape expected = tile_rows == 1 ? fp8_tile_scale_shape(values) : fp8_scale_shape(values);
  check_shape(scale, expected, op, scale_name);
}

// The tile_rows x 128 tiles of a row-major [rows, cols] matrix, each quantized with its own
// scale (scale is [ceil(rows/tile_rows), ceil(cols/128)]).
inline void quantize_fp8_host(const float* x, fp8_e4m3* codes, float* scale, int64_t rows, int64_t cols,
                              int64_t tile_rows) {
  const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows, col_tiles = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  parallel_for(row_tiles, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t row_begin = ti * tile_rows, row_end = std::min(rows, row_begin + tile_rows);
      for (int64_t tj = 0; tj < col_tiles; ++tj) {
        const int64_t col_begin = tj * kFp8BlockSize, col_end = std::min(cols, col_begin + kFp8BlockSize);
        float amax = kFp8AmaxFloor;
        for (int64_t r = row_begin; r < row_end; ++r)
          for (int64_t c = col_begin; c < col_end; ++c) amax = std::max(amax, std::abs(x[r * cols + c]));
        const float to_codes = 448.0f / amax;
        for (int64_t r = row_begin; r < row_end; ++r)
          for (int64_t c = col_begin; c < col_end; ++c) codes[r * cols + c] = fp8_e4m3::from_float(x[r * cols + c] * to_codes);
        scale[ti * col_tiles + tj] = amax / 448.0f;
      }
    }
  }, min_items_per_thread(tile_rows * cols));
}

inline void dequantize_fp8_host(ConstView<fp8_e4m3> codes, ConstView<float> scale, MutableView<float> x, int64_t tile_rows,
                                const char* op) {
  check_fp8_matrix(x, op, "x");
  check_fp8_quantized<Cpu>(x.shape(), codes, scale, tile_rows, op);
  const int64_t rows = x.size(0), cols = x.size(1), col_tiles = scale.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* scale_row = scale.data() + (r / tile_rows) * col_tiles;
    for (int64_t c = 0; c < cols; ++c) x.data()[r * cols + c] = codes.data()[r * cols + c].to_float() * scale_row[c / kFp8BlockSize];
  }
}

}  // namespace detail

R1_DECLARE_IMPL(Fp8Impl, "fp8.cuh");

template <>
struct Fp8Impl<Cpu> {
  static void quantize(ConstView<float> x, MutableView<fp8_e4m3> codes, MutableView<float> scale, int64_t tile_rows) {
    detail::quantize_fp8_host(x.data(), codes.data(), scale.data(), x.size(0), x.size(1), tile_rows);
  }

  template <class Y>
  static void gemm(ConstView<fp8_e4m3> a, ConstView<float> a_scale, ConstView<fp8_e4m3> w, ConstView<float> w_scale_inv,
                   MutableView<Y> y) {
    const int64_t m_rows = a.size(0), k_dim = a.size(1), n_cols = w.size(0), k_blocks = a_scale.size(1);
    // e4m3 values are exact in float: decode every code once.
    std::array<float, 256> table;
    for (int b = 0; b < 256; ++b) table[b] = fp8_e4m3::from_bits(static_cast<uint8_t>(b)).to_float();
    const auto decode = [&](ConstView<fp8_e4m3> codes) {
      std::vector<float> values(static_cast<std::size_t>(codes.numel()));
      for (std::size_t i = 0; i < values.size(); ++i) values[i] = table[codes.data()[i].bits];
      return values;
    };
    const std::vector<float> a_values = decode(a), w_values = decode(w);
    parallel_for(m_rows, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const float* a_row = a_values.data() + m * k_dim;
        for (int64_t n = 0; n < n_cols; ++n) {
          const float* w_row = w_values.data() + n * k_dim;
          const float* w_scale_row = w_scale_inv.data() + (n / kFp8BlockSize) * k_blocks;
          float total = 0.0f;
          for (int64_t kb = 0; kb < k_blocks; ++kb) {
            const int64_t k_end = std::min(k_dim, (kb + 1) * kFp8BlockSize);
            // Exact products, so a contracted a*b+c (an FMA) gives the same sum as a*b then +c.
            float partial = 0.0f;
            for (int64_t k = kb * kFp8BlockSize; k < k_end; ++k) partial += a_row[k] * w_row[k];
            total = std::fma(partial, a_scale.data()[m * k_blocks + kb] * w_scale_row[kb], total);
          }
          y.data()[m * n_cols + n] = convert_scalar<Y>(total);
        }
      }
    }, min_items_per_thread(n_cols * k_dim));
  }
};

namespace detail {

template <class Dev>
void quantize_fp8(ConstView<float, Dev> x, MutableView<fp8_e4m3, Dev> codes, MutableView<float, Dev> scale,
                  int64_t tile_rows, const char* op) {
  check_fp8_matrix(x, op, "x");
  check_fp8_quantized<Dev>(x.shape(), codes, scale, tile_rows, op);
  if (x.numel() > 0) Fp8Impl<Dev>::quantize(x, codes, scale, tile_rows);
}

template <class Dev, class Y>
void fp8_gemm(ConstView<fp8_e4m3, Dev> a, ConstView<float, Dev> a_scale, ConstView<fp8_e4m3, Dev> w,
              ConstView<float, Dev> w_scale_inv, MutableView<Y, Dev> y) {
  constexpr const char* op = "fp8.gemm";
  check_fp8_quantized<Dev>(a.shape(), a, a_scale, 1, op, "a", "a_scale");
  check_fp8_quantized<Dev>(w.shape(), w, w_scale_inv, kFp8BlockSize, op, "w", "w_scale_inv");
  R1_CHECK(a.size(1) == w.size(1), "[fp8.gemm] a has shape ", a.shape(), " and w has shape ", w.shape(),
           ": their K (last dims) differ");
  check_fp8_matrix(y, op, "y");
  check_shape(y, Shape{a.size(0), w.size(0)}, op, "y");
  if (y.numel() > 0) Fp8Impl<Dev>::template gemm<Y>(a, a_scale, w, w_scale_inv, y);
}

}  // namespace detail

// Activations x[M,K] -> codes[M,K] and scale[M, ceil(K/128)], one scale per 1x128 tile.
template <class Dev = Cpu>
void quantize_fp8_tiles(ConstView<float, Dev> x, MutableView<fp8_e4m3, Dev> codes, MutableView<float, Dev> scale) {
  detail::quantize_fp8<Dev>(x, codes, scale, 1, "fp8.quantize_tiles");
}

// A weight w[N,K] -> codes[N,K] and scale_inv[ceil(N/128), ceil(K/128)], one per 128x128 block.
template <class Dev = Cpu>
void quantize_fp8_blocks(ConstView<float, Dev> w, MutableView<fp8_e4m3, Dev> codes, MutableView<float, Dev> scale_inv) {
  detail::quantize_fp8<Dev>(w, codes, scale_inv, kFp8BlockSize, "fp8.quantize_blocks");
}

// x[m,k] = codes[m,k] * scale[m, k/128]
inline void dequantize_fp8_tiles(ConstView<fp8_e4m3> codes, ConstView<float> scale, MutableView<float> x) {
  detail::dequantize_fp8_host(codes, scale, x, 1, "fp8.dequantize_tiles");
}

// w[n,k] = codes[n,k] * scale_inv[n/128, k/128]
inline void dequantize_fp8_blocks(ConstView<fp8_e4m3> codes, ConstView<float> scale_inv, MutableView<float> w) {
  detail::dequantize_fp8_host(codes, scale_inv, w, kFp8BlockSize, "fp8.dequantize_blocks");
}

// y[M,N] from a[M,K] (1x128 tile scales a_scale[M,KB]) and w[N,K] (128x128 block scales
// w_scale_inv[NB,KB]), accumulated as the header describes; y is float or bf16 (rounded
// to nearest even from the fp32 total).
template <class Dev = Cpu>
void fp8_gemm(ConstView<fp8_e4m3, Dev> a, ConstView<float, Dev> a_scale, ConstView<fp8_e4m3, Dev> w,
              ConstView<float, Dev> w_scale_inv, MutableView<float, Dev> y) {
  detail::fp8_gemm<Dev, float>(a, a_scale, w, w_scale_inv, y);
}

template <class Dev = Cpu>
void fp8_gemm(ConstView<fp8_e4m3, Dev> a, ConstView<float, Dev> a_scale, ConstView<fp8_e4m3, Dev> w,
              ConstView<float, Dev> w_scale_inv, MutableView<bf16, Dev> y) {
  detail::fp8_gemm<Dev, bf16>(a, a_scale, w, w_scale_inv, y);
}

// ---------------------------------------------------------------------------------------
// Params: a bias-free linear layer stored as DeepSeek-V3 ships it, y = x W^T with
// W = weight * weight_scale_inv per 128x128 block.
template <class Dev = Cpu>
struct Fp8Linear {
  Tensor<fp8_e4m3, Dev> weight;        // [out_features, in_features]
  Tensor<float, Dev> weight_scale_inv;  // [ceil(out/128), ceil(in/128)]

  Fp8Linear() = default;
  Fp8Linear(int64_t in_features, int64_t out_features)
      : weight(checked_shape(in_features, out_features)), weight_scale_inv(fp8_scale_shape(weight.shape())) {}

  // Quantizes a float weight [out, in] per 128x128 block (on Dev).
  static Fp8Linear from_float(ConstView<float, Dev> w) {
    R1_CHECK(w.rank() == 2, "[fp8_linear.from_float] weight has shape ", w.shape(), ", expected [out, in]");
    Fp8Linear p(w.size(1), w.size(0));
    quantize_fp8_blocks<Dev>(w, p.weight.view(), p.weight_scale_inv.view());
    return p;
  }

  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }

  template <class F>
  void visit(F&& f) {
    f("weight", weight);
    f("weight_scale_inv", weight_scale_inv);
  }

 private:
  static Shape checked_shape(int64_t in_features, int64_t out_features) {
    R1_CHECK(in_features > 0 && out_features > 0, "[fp8_linear] in_features ", in_features, " and out_features ",
             out_features, " must be positive");
    return Shape{out_features, in_features};
  }
};

// x quantized per 1x128 tile, as apply feeds it to the GEMM; reused across calls.
template <class Dev = Cpu>
struct Fp8Activations {
  Tensor<fp8_e4m3, Dev> codes;  // [M, K]
  Tensor<float, Dev> scale;     // [M, ceil(K/128)]
};

namespace detail {

template <class Dev, class Y>
void apply_fp8(const Fp8Linear<Dev>& p, ConstView<float, Dev> x, MutableView<Y, Dev> y, Fp8Activations<Dev>& scratch) {
  R1_CHECK(p.weight.rank() == 2, "[fp8_linear.apply] weight has shape ", p.weight.shape(), ", expected [out, in]");
  R1_CHECK(x.rank() >= 1 && x.size(x.rank() - 1) == p.in_features(), "[fp8_linear.apply] x has shape ", x.shape(),
           ", expected last dim ", p.in_features());
  R1_CHECK(x.is_contiguous() && y.is_contiguous(), "[fp8_linear.apply] x and y must be contiguous");
  Shape out = x.shape();
  out.dims[out.rank - 1] = p.out_features();
  check_shape(y, out, "fp8_linear.apply", "y");
  const Shape rows{x.numel() / p.in_features(), p.in_features()};
  scratch.codes.resize(rows);
  scratch.scale.resize(fp8_tile_scale_shape(rows));
  quantize_fp8_tiles<Dev>(x.reshape(rows), scratch.codes.view(), scratch.scale.view());
  fp8_gemm<Dev>(scratch.codes.view(), scratch.scale.view(), p.weight.view(), p.weight_scale_inv.view(),
                y.reshape(Shape{rows[0], p.out_features()}));
}

}  // namespace detail

// y[..., out] = x[..., in] W^T: x is quantized per 1x128 tile into scratch, then multiplied
// by the block-scaled weight. y is float or bf16.
template <class Dev>
void apply(const Fp8Linear<Dev>& p, ConstView<float, Dev> x, MutableView<float, Dev> y, Fp8Activations<Dev>& scratch) {
  detail::apply_fp8<Dev, float>(p, x, y, scratch);
}

template <class Dev>
void apply(const Fp8Linear<Dev>& p, ConstView<float, Dev> x, MutableView<bf16, Dev> y, Fp8Activations<Dev>& scratch) {
  detail::apply_fp8<Dev, bf16>(p, x, y, scratch);
}

template <class Dev>
void apply(const Fp8Linear<Dev>& p, ConstView<float, Dev> x, MutableView<float, Dev> y) {
  Fp8Activations<Dev> scratch;
  detail::apply_fp8<Dev, float>(p, x, y, scratch);
}

template <class Dev>
void apply(const Fp8Linear<Dev>& p, ConstView<float, Dev> x, MutableView<bf16, Dev> y) {
  Fp8Activations<Dev> scratch;
  detail::apply_fp8<Dev, bf16>(p, x, y, scratch);
}

}  // namespace r1
