// Tests for r1/fp8.hpp: 1x128 and 128x128 quantization, dequantization, the block-scaled
// FP8 GEMM and Fp8Linear, on the CPU (the reference the CUDA kernels are checked against).
//
// The GEMM is checked against a float64 dequantize-then-multiply on the same codes and
// scales. No PyTorch fixture: torch 1.13 (Debian's) has no float8 dtype, so a generator would
// have to simulate e4m3 rounding itself, i.e. repeat r1's own conversion (tested bit for bit
// in test_tensor.cpp) rather than check it; and given the codes, float64 is an exact
// reference up to the rounding of its own additions, far below the bound tested here.
#include <r1/fp8.hpp>

#include "support.hpp"

#include <cmath>

using r1::bf16;
using r1::fp8_e4m3;
using r1::Shape;
using r1::Tensor;

namespace {

Tensor<float> random_matrix(int64_t rows, int64_t cols, uint64_t seed, double std = 1.0) {
  return r1test::random_tensor<float>(Shape{rows, cols}, seed, std);
}

struct Quantized {
  Tensor<fp8_e4m3> codes;
  Tensor<float> scale;
};

Quantized quantize_tiles(const Tensor<float>& x) {
  Quantized q{Tensor<fp8_e4m3>(x.shape()), Tensor<float>(r1::fp8_tile_scale_shape(x.shape()))};
  r1::quantize_fp8_tiles(x, q.codes.view(), q.scale.view());
  return q;
}

Quantized quantize_blocks(const Tensor<float>& w) {
  Quantized q{Tensor<fp8_e4m3>(w.shape()), Tensor<float>(r1::fp8_scale_shape(w.shape()))};
  r1::quantize_fp8_blocks(w, q.codes.view(), q.scale.view());
  return q;
}

// Every element within half an e4m3 step of its value: 2^-4 relative for normal codes,
// 2^-10 of the scale in the subnormal range, plus a few float roundings (x * 448/amax,
// amax/448, code * scale). So also within 2^-4 of its tile's max.
void check_round_trip(const Tensor<float>& x, const Quantized& q, int64_t tile_rows) {
  Tensor<float> back(x.shape());
  if (tile_rows == 1) {
    r1::dequantize_fp8_tiles(q.codes, q.scale, back.view());
  } else {
    r1::dequantize_fp8_blocks(q.codes, q.scale, back.view());
  }
  const int64_t cols = x.size(1);
  for (int64_t r = 0; r < x.size(0); ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const double value = x.data()[r * cols + c], got = back.data()[r * cols + c];
      const double scale = q.scale.data()[(r / tile_rows) * q.scale.size(1) + c / 128];
      const double bound = (0x1p-4 + 0x1p-20) * std::abs(value) + 0x1p-10 * scale * (1 + 0x1p-20);
      INFO("element (" << r << ", " << c << "): " << value << " came back as " << got);
      REQUIRE(std::abs(got - value) <= bound);
      REQUIRE(std::abs(got - value) <= 0x1p-4 * 448.0 * scale);
    }
  }
}

// y64[m,n] = sum_k (code_a * a_scale) (code_w * w_scale) in float64, and the bound on the
// fp32 reference's distance from it: the partial sums' roundings (128 additions per block),
// the promotions' (one per block) and the scale product's, each at most 2^-24 of the sum
// of the absolute terms.
struct Reference {
  Tensor<double> y, bound;
};

Reference gemm_reference(const Quantized& a, const Quantized& w) {
  const int64_t m_rows = a.codes.size(0), k_dim = a.codes.size(1), n_cols = w.codes.size(0);
  const int64_t k_blocks = a.scale.size(1);
  Reference ref{Tensor<double>(Shape{m_rows, n_cols}), Tensor<double>(Shape{m_rows, n_cols})};
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t n = 0; n < n_cols; ++n) {
      double sum = 0.0, abs_sum = 0.0;
      for (int64_t k = 0; k < k_dim; ++k) {
        const double term = static_cast<double>(a.codes(m, k).to_float()) * a.scale(m, k / 128) *
                            static_cast<double>(w.codes(n, k).to_float()) * w.scale(n / 128, k / 128);
        sum += term;
        abs_sum += std::abs(term);
      }
      ref.y(m, n) = sum;
      ref.bound(m, n) = (128 + k_blocks + 4) * 0x1p-24 * abs_sum + 1e-30;
    }
  }
  return ref;
}

void check_gemm(int64_t m_rows, int64_t n_cols, int64_t k_dim, uint64_t seed) {
  INFO("M " << m_rows << ", N " << n_cols << ", K " << k_dim);
  const Tensor<float> x = random_matrix(m_rows, k_dim, seed);
  const Tensor<float> w = random_matrix(n_cols, k_dim, seed + 1, 0.05);
  const Quantized a = quantize_tiles(x), qw = quantize_blocks(w);
  Tensor<float> y(Shape{m_rows, n_cols});
  r1::fp8_gemm(a.codes, a.scale, qw.codes, qw.scale, y.view());
  const Reference ref = gemm_reference(a, qw);
  for (int64_t i = 0; i < y.numel(); ++i) {
    INFO("element " << i << ": " << y.data()[i] << " against " << ref.y.data()[i]);
    REQUIRE(std::abs(y.data()[i] - ref.y.data()[i]) <= ref.bound.data()[i]);
  }
  // bf16 output is the fp32 total rounded to nearest even.
  Tensor<bf16> y16(Shape{m_rows, n_cols});
  r1::fp8_gemm(a.codes, a.scale, qw.codes, qw.scale, y16.view());
  for (int64_t i = 0; i < y.numel(); ++i) REQUIRE(y16.data()[i] == bf16::from_float(y.data()[i]));
  // And the whole scheme stays close to the float product it approximates (a few percent
  // of the row's magnitude: two e4m3 roundings of at most 2^-4 each).
  Tensor<float> exact(Shape{m_rows, n_cols});
  exact.matrix() = x.matrix() * w.matrix().transpose();
  const double scale = std::sqrt(static_cast<double>(k_dim)) * 0.05;
  REQUIRE(r1test::max_abs_diff(y, exact) <= 0.2 * scale);
}

}  // namespace

TEST_CASE("fp8: 1x128 activation tiles round-trip within half an e4m3 step, tails and zero tiles too", "[fp8]") {
  Tensor<float> x = random_matrix(37, 300, 1);  // 300 = 2 full tiles and a 44-column tail
  for (int64_t c = 128; c < 256; ++c) x(5, c) = 0.0f;  // an all-zero tile
  x(7, 3) = 1e6f;                                       // a tile dominated by one outlier
  const Quantized q = quantize_tiles(x);
  REQUIRE(q.scale.shape() == Shape{37, 3});
  check_round_trip(x, q, 1);

  for (int64_t c = 128; c < 256; ++c) REQUIRE(q.codes(5, c).bits == 0);
  REQUIRE(q.scale(5, 1) == 1e-4f / 448.0f);
  // Each tile's largest magnitude maps to +-448, the largest e4m3 value.
  REQUIRE(std::abs(q.codes(7, 3).to_float()) == 448.0f);
  REQUIRE(q.scale(7, 0) == 1e6f / 448.0f);
  // The tail tile's scale comes from its 44 columns alone.
  float tail_amax = 0.0f;
  for (int64_t c = 256; c < 300; ++c) tail_amax = std::max(tail_amax, std::abs(x(11, c)));
  REQUIRE(q.scale(11, 2) == tail_amax / 448.0f);
}

TEST_CASE("fp8: codes are e4m3(x * (448 / amax)) rounded to nearest even", "[fp8]") {
  const Tensor<float> x = random_matrix(3, 200, 2, 3.0);
  const Quantized q = quantize_tiles(x);
  for (int64_t r = 0; r < 3; ++r) {
    for (int64_t tile = 0; tile < 2; ++tile) {
      float amax = 1e-4f;
      for (int64_t c = tile * 128; c < std::min<int64_t>(200, tile * 128 + 128); ++c) amax = std::max(amax, std::abs(x(r, c)));
      for (int64_t c = tile * 128; c < std::min<int64_t>(200, tile * 128 + 128); ++c)
        REQUIRE(q.codes(r, c) == fp8_e4m3::from_float(x(r, c) * (448.0f / amax)));
    }
  }
}

TEST_CASE("fp8: exact e4m3 values survive quantization unchanged", "[fp8]") {
  // Every finite e4m3 value, scaled by 2^-3 with the tile max at 448 * 2^-3: the scale is a
  // power of two, so x * (448 / amax) is exact and each code comes back as itself.
  Tensor<float> x(Shape{2, 256});
  int64_t i = 0;
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7F) == 0x7F) continue;  // NaN codes
    x.data()[i++] = fp8_e4m3::from_bits(static_cast<uint8_t>(b)).to_float() * 0.125f;
  }
  for (; i < x.numel(); ++i) x.data()[i] = 56.0f;  // 448 * 2^-3, so every tile's amax is the same
  const Quantized q = quantize_tiles(x);
  for (int64_t t = 0; t < q.scale.numel(); ++t) REQUIRE(q.scale.data()[t] == 0.125f);
  Tensor<float> back(x.shape());
  r1::dequantize_fp8_tiles(q.codes, q.scale, back.view());
  REQUIRE(r1test::max_abs_diff(back, x) == 0.0);
  for (int64_t j = 0; j < x.numel(); ++j) REQUIRE(q.codes.data()[j].to_float() * 0.125f == x.data()[j]);
}

TEST_CASE("fp8: 128x128 weight blocks round-trip, with row and column tails", "[fp8]") {
  Tensor<float> w = random_matrix(300, 200, 3, 0.02);  // 3 x 2 blocks, tails in both dims
  for (int64_t r = 128; r < 256; ++r)
    for (int64_t c = 0; c < 128; ++c) w(r, c) = 0.0f;
  const Quantized q = quantize_blocks(w);
  REQUIRE(q.scale.shape() == Shape{3, 2});
  check_round_trip(w, q, 128);
  REQUIRE(q.scale(1, 0) == 1e-4f / 448.0f);
  float corner_amax = 0.0f;
  for (int64_t r = 256; r < 300; ++r)
    for (int64_t c = 128; c < 200; ++c) corner_amax = std::max(corner_amax, std::abs(w(r, c)));
  REQUIRE(q.scale(2, 1) == corner_amax / 448.0f);
}

TEST_CASE("fp8: block-scaled GEMM matches a float64 dequantize-then-multiply", "[fp8]") {
  check_gemm(1, 256, 512, 10);    // a single token
  check_gemm(37, 300, 384, 11);   // odd M, N not a multiple of 128
  check_gemm(64, 128, 1024, 12);  // 8 K blocks
  check_gemm(5, 130, 200, 13);    // the CPU path also takes a K tail
}

TEST_CASE("fp8: the GEMM promotes each 128-wide K block with its own scales", "[fp8]") {
  // Two K blocks with scales that differ by 2^20: summing codes across blocks before
  // scaling would be wildly off, and so would using one block's scale for both.
  Tensor<float> x(Shape{1, 256}), w(Shape{1, 256});
  for (int64_t k = 0; k < 256; ++k) {
    x(0, k) = k < 128 ? 1.0f : 0x1p-20f;
    w(0, k) = 1.0f;
  }
  const Quantized a = quantize_tiles(x), qw = quantize_blocks(w);
  Tensor<float> y(Shape{1, 1});
  r1::fp8_gemm(a.codes, a.scale, qw.codes, qw.scale, y.view());
  // The scales are 1/448 and 2^-20/448, rounded: within 2 ulps (2^-16 at 128) of exact,
  // and dropping the second block would be 128 * 2^-20 = 8 ulps off.
  REQUIRE(std::abs(y(0, 0) - (128.0 + 128.0 * 0x1p-20)) <= 2 * 0x1p-16);
}

TEST_CASE("fp8: Fp8Linear quantizes a weight and applies it to x of any leading dims", "[fp8]") {
  const Tensor<float> w = random_matrix(200, 256, 20, 0.05);
  const r1::Fp8Linear<> p = r1::Fp8Linear<>::from_float(w);
  REQUIRE(p.in_features() == 256);
  REQUIRE(p.out_features() == 200);
  const Quantized qw = quantize_blocks(w);
  REQUIRE(r1test::max_abs_diff(p.weight_scale_inv, qw.scale) == 0.0);
  for (int64_t i = 0; i < qw.codes.numel(); ++i) REQUIRE(p.weight.data()[i] == qw.codes.data()[i]);

  r1::Fp8Linear<> named = p;
  std::vector<std::string> names;
  named.visit([&](const std::string& name, const auto&) { names.push_back(name); });
  REQUIRE(names == std::vector<std::string>{"weight", "weight_scale_inv"});

  Tensor<float> x(Shape{2, 3, 256});
  r1::Rng rng(21);
  r1::fill_normal(x.view(), rng);
  Tensor<float> y(Shape{2, 3, 200});
  r1::Fp8Activations<> scratch;
  r1::apply(p, x, y.view(), scratch);
  REQUIRE(scratch.scale.shape() == Shape{6, 2});

  const Quantized a = quantize_tiles(to_tensor(x.view().reshape(Shape{6, 256})));
  Tensor<float> expected(Shape{6, 200});
  r1::fp8_gemm(a.codes, a.scale, p.weight, p.weight_scale_inv, expected.view());
  for (int64_t i = 0; i < y.numel(); ++i) REQUIRE(y.data()[i] == expected.data()[i]);

  Tensor<bf16> y16(Shape{2, 3, 200});
  r1::apply(p, x, y16.view());
  for (int64_t i = 0; i < y.numel(); ++i) REQUIRE(y16.data()[i] == bf16::from_float(y.data()[i]));
}

TEST_CASE("fp8: shape and argument errors", "[fp8]") {
  const Tensor<float> x = random_matrix(4, 256, 30);
  Tensor<fp8_e4m3> codes(Shape{4, 256});
  Tensor<float> scale(Shape{4, 2});
  Tensor<fp8_e4m3> short_codes(Shape{4, 128});
  REQUIRE_R1_ERROR(r1::quantize_fp8_tiles(x, short_codes.view(), scale.view()),
                   "[fp8.quantize_tiles] codes has shape [4, 128], expected [4, 256]");
  Tensor<float> block_scale(Shape{1, 2});
  REQUIRE_R1_ERROR(r1::quantize_fp8_tiles(x, codes.view(), block_scale.view()),
                   "[fp8.quantize_tiles] scale has shape [1, 2], expected [4, 2]");
  REQUIRE_R1_ERROR(r1::quantize_fp8_blocks(x, codes.view(), scale.view()),
                   "[fp8.quantize_blocks] scale has shape [4, 2], expected [1, 2]");
  const Tensor<float> vector(Shape{256});
  REQUIRE_R1_ERROR(r1::quantize_fp8_tiles(vector, codes.view(), scale.view()),
                   "[fp8.quantize_tiles] x has shape [256], expected a matrix");
  REQUIRE_R1_ERROR(r1::quantize_fp8_tiles(x.view().slice(1, 0, 128), short_codes.view(), scale.view()),
                   "[fp8.quantize_tiles] x must be contiguous");

  r1::quantize_fp8_tiles(x, codes.view(), scale.view());
  const Quantized w = quantize_blocks(random_matrix(130, 256, 31));
  Tensor<float> y(Shape{4, 130});
  r1::fp8_gemm(codes, scale, w.codes, w.scale, y.view());
  const Quantized w_other_k = quantize_blocks(random_matrix(130, 384, 32));
  REQUIRE_R1_ERROR(r1::fp8_gemm(codes, scale, w_other_k.codes, w_other_k.scale, y.view()),
                   "[fp8.gemm] a has shape [4, 256] and w has shape [130, 384]: their K (last dims) differ");
  REQUIRE_R1_ERROR(r1::fp8_gemm(codes, scale, w.codes, scale, y.view()),
                   "[fp8.gemm] w_scale_inv has shape [4, 2], expected [2, 2]");
  REQUIRE_R1_ERROR(r1::fp8_gemm(codes, w.scale, w.codes, w.scale, y.view()),
                   "[fp8.gemm] a_scale has shape [2, 2], expected [4, 2]");
  Tensor<float> y_wrong(Shape{4, 128});
  REQUIRE_R1_ERROR(r1::fp8_gemm(codes, scale, w.codes, w.scale, y_wrong.view()),
                   "[fp8.gemm] y has shape [4, 128], expected [4, 130]");

  Tensor<float> back(Shape{4, 128});
  REQUIRE_R1_ERROR(r1::dequantize_fp8_tiles(codes, scale, back.view()),
                   "[fp8.dequantize_tiles] codes has shape [4, 256], expected [4, 128]");

  REQUIRE_R1_ERROR(r1::Fp8Linear<>(0, 5), "[fp8_linear] in_features 0 and out_features 5 must be positive");
  REQUIRE_R1_ERROR(r1::Fp8Linear<>::from_float(vector), "[fp8_linear.from_float] weight has shape [256], expected [out, in]");
  const r1::Fp8Linear<> p = r1::Fp8Linear<>::from_float(random_matrix(130, 256, 33));
  Tensor<float> x_wrong(Shape{4, 200});
  REQUIRE_R1_ERROR(r1::apply(p, x_wrong, y.view()), "[fp8_linear.apply] x has shape [4, 200], expected last dim 256");
  REQUIRE_R1_ERROR(r1::apply(p, x, y_wrong.view()), "[fp8_linear.apply] y has shape [4, 128], expected [4, 130]");
}
