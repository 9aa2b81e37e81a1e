// Tests for r1/cuda/fp8.cuh (needs a GPU with FP8 tensor cores, sm_89+): the quantization
// kernels against the CPU reference byte for byte, the block-scaled GEMM against the CPU
// GEMM on the same codes and scales, Fp8Linear on the device, tails and errors.
//
// The GEMM bound. Given the same codes and scales, the device and the CPU compute the same
// promotions (fma(partial, a_scale * w_scale, total), block by block); only each block's
// partial sum differs, in its order and in the tensor cores' accumulation, which keeps
// fewer bits than fp32 (DeepSeek-V3's report measures about 14 on H800: the reason for
// promoting every 128 products). So the check is against the sum of absolute terms,
// |y_cuda - y_cpu| <= 2^-11 * sum_k |a_k w_k| (dequantized), a few times the worst case of a
// 14-bit accumulator over four k32 steps per block, and far below what any indexing or
// scaling mistake costs (one dropped or doubled term is ~1/K of that sum on average, a
// wrong scale block is O(1)). A second test makes every partial sum a small integer, which
// every accumulator holds exactly: there the device must match the CPU bit for bit.
#include <r1/cuda/fp8.cuh>

#include "cuda_support.hpp"
#include "support.hpp"

#include <cmath>
#include <cstring>
#include <tuple>

using r1::bf16;
using r1::Cuda;
using r1::fp8_e4m3;
using r1::Shape;
using r1::Tensor;
using r1test::to_device;
using r1test::to_host;

namespace {

Tensor<float> random_matrix(int64_t rows, int64_t cols, uint64_t seed, double std = 1.0) {
  return r1test::random_tensor<float>(Shape{rows, cols}, seed, std);
}

void require_same_bytes(const Tensor<fp8_e4m3>& a, const Tensor<fp8_e4m3>& b) {
  REQUIRE(a.shape() == b.shape());
  for (int64_t i = 0; i < a.numel(); ++i) {
    INFO("code " << i << ": " << int(a.data()[i].bits) << " against " << int(b.data()[i].bits));
    REQUIRE(a.data()[i].bits == b.data()[i].bits);
  }
}

void require_equal(const Tensor<float>& a, const Tensor<float>& b) {
  REQUIRE(a.shape() == b.shape());
  for (int64_t i = 0; i < a.numel(); ++i) {
    INFO("element " << i << ": " << a.data()[i] << " against " << b.data()[i]);
    REQUIRE(std::memcmp(&a.data()[i], &b.data()[i], sizeof(float)) == 0);
  }
}

struct Quantized {
  Tensor<fp8_e4m3> codes;
  Tensor<float> scale;
};

Quantized quantize_on_host(const Tensor<float>& x, bool blocks) {
  Quantized q{Tensor<fp8_e4m3>(x.shape()),
              Tensor<float>(blocks ? r1::fp8_scale_shape(x.shape()) : r1::fp8_tile_scale_shape(x.shape()))};
  if (blocks) {
    r1::quantize_fp8_blocks(x, q.codes.view(), q.scale.view());
  } else {
    r1::quantize_fp8_tiles(x, q.codes.view(), q.scale.view());
  }
  return q;
}

Quantized quantize_on_device(const Tensor<float>& x, bool blocks) {
  const Tensor<float, Cuda> device_x = to_device(x);
  Tensor<fp8_e4m3, Cuda> codes(x.shape());
  Tensor<float, Cuda> scale(blocks ? r1::fp8_scale_shape(x.shape()) : r1::fp8_tile_scale_shape(x.shape()));
  if (blocks) {
    r1::quantize_fp8_blocks<Cuda>(device_x, codes.view(), scale.view());
  } else {
    r1::quantize_fp8_tiles<Cuda>(device_x, codes.view(), scale.view());
  }
  return Quantized{to_host(codes), to_host(scale)};
}

// Activations with what exercises the conversion: an all-zero tile, an outlier tile whose
// other values land on e4m3 subnormals and zero, a tiny-valued row under the 1e-4 amax
// floor; and in every tile the largest value meets the 448 saturation edge.
Tensor<float> awkward_activations(int64_t rows, int64_t cols, uint64_t seed) {
  Tensor<float> x = random_matrix(rows, cols, seed);
  for (int64_t c = 0; c < std::min<int64_t>(cols, 128); ++c) x(0, c) = 0.0f;
  if (rows > 1) x(1, 5) = 3e4f;
  if (rows > 2)
    for (int64_t c = 0; c < cols; ++c) x(2, c) *= 1e-6f;
  return x;
}

void check_quantization(int64_t rows, int64_t cols, bool blocks, uint64_t seed) {
  INFO((blocks ? "128x128 blocks" : "1x128 tiles") << " of [" << rows << ", " << cols << "]");
  const Tensor<float> x = awkward_activations(rows, cols, seed);
  const Quantized host = quantize_on_host(x, blocks), device = quantize_on_device(x, blocks);
  require_same_bytes(device.codes, host.codes);
  require_equal(device.scale, host.scale);
}

// The device GEMM of the given codes and scales, into float and into bf16.
struct DeviceGemm {
  Tensor<float> y;
  Tensor<bf16> y16;
};

DeviceGemm gemm_on_device(const Quantized& a, const Quantized& w) {
  const Tensor<fp8_e4m3, Cuda> a_codes = to_device(a.codes), w_codes = to_device(w.codes);
  const Tensor<float, Cuda> a_scale = to_device(a.scale), w_scale = to_device(w.scale);
  Tensor<float, Cuda> y(Shape{a.codes.size(0), w.codes.size(0)});
  Tensor<bf16, Cuda> y16(y.shape());
  r1::fp8_gemm<Cuda>(a_codes, a_scale, w_codes, w_scale, y.view());
  r1::fp8_gemm<Cuda>(a_codes, a_scale, w_codes, w_scale, y16.view());
  return DeviceGemm{to_host(y), to_host(y16)};
}

// sum_k |a[m,k] w[n,k]| with the codes dequantized: the scale of the GEMM bound.
Tensor<double> absolute_sums(const Quantized& a, const Quantized& w) {
  const int64_t m_rows = a.codes.size(0), n_cols = w.codes.size(0), k_dim = a.codes.size(1);
  Tensor<float> a_values(a.codes.shape()), w_values(w.codes.shape());
  r1::dequantize_fp8_tiles(a.codes, a.scale, a_values.view());
  r1::dequantize_fp8_blocks(w.codes, w.scale, w_values.view());
  Tensor<double> sums(Shape{m_rows, n_cols});
  r1::parallel_for(m_rows, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t n = 0; n < n_cols; ++n) {
        double sum = 0.0;
        for (int64_t k = 0; k < k_dim; ++k) sum += std::abs(double(a_values(m, k)) * w_values(n, k));
        sums(m, n) = sum;
      }
  });
  return sums;
}

void check_gemm(int64_t m_rows, int64_t n_cols, int64_t k_dim, uint64_t seed) {
  INFO("M " << m_rows << ", N " << n_cols << ", K " << k_dim);
  const Quantized a = quantize_on_host(awkward_activations(m_rows, k_dim, seed), false);
  const Quantized w = quantize_on_host(random_matrix(n_cols, k_dim, seed + 1, 0.05), true);
  Tensor<float> expected(Shape{m_rows, n_cols});
  r1::fp8_gemm(a.codes, a.scale, w.codes, w.scale, expected.view());
  const DeviceGemm got = gemm_on_device(a, w);
  const Tensor<double> sums = absolute_sums(a, w);
  double worst = 0.0;
  int64_t worst_at = 0;
  for (int64_t i = 0; i < expected.numel(); ++i) {
    const double ratio = std::abs(double(got.y.data()[i]) - expected.data()[i]) / (sums.data()[i] + 1e-30);
    if (ratio > worst) worst = ratio, worst_at = i;
  }
  INFO("worst at element " << worst_at << ": " << got.y.data()[worst_at] << " against " << expected.data()[worst_at]
                           << ", error / sum of |terms| = " << worst);
  REQUIRE(worst <= 0x1p-11);
  for (int64_t i = 0; i < expected.numel(); ++i) REQUIRE(got.y16.data()[i] == bf16::from_float(got.y.data()[i]));
}

}  // namespace

TEST_CASE("cuda fp8: 1x128 tile quantization matches the CPU byte for byte", "[cuda][fp8]") {
  check_quantization(37, 300, false, 1);  // a 44-column tail tile
  check_quantization(1, 7168, false, 2);
  check_quantization(515, 1536, false, 3);
}

TEST_CASE("cuda fp8: exact e4m3 values quantize to themselves on the device", "[cuda][fp8]") {
  Tensor<float> x(Shape{1, 256});
  int64_t i = 0;
  for (int b = 0; b < 256; ++b)
    if ((b & 0x7F) != 0x7F) x.data()[i++] = fp8_e4m3::from_bits(static_cast<uint8_t>(b)).to_float();
  for (; i < x.numel(); ++i) x.data()[i] = 448.0f;
  const Quantized device = quantize_on_device(x, false);
  for (int64_t j = 0; j < x.numel(); ++j) REQUIRE(device.codes.data()[j].to_float() == x.data()[j]);
  REQUIRE(device.scale(0, 0) == 1.0f);
}

TEST_CASE("cuda fp8: 128x128 block quantization matches the CPU byte for byte", "[cuda][fp8]") {
  check_quantization(300, 200, true, 4);  // tails in both dims
  check_quantization(389, 643, true, 5);
  check_quantization(128, 128, true, 6);
}

TEST_CASE("cuda fp8: GEMM with integer partial sums matches the CPU bit for bit", "[cuda][fp8]") {
  // Codes in {-3..3} (exact e4m3 values): every product and partial sum is an integer below
  // 2^11, exact in any accumulator and any order, so the promotions see the CPU's partials.
  const auto small_codes = [](int64_t rows, int64_t cols, uint64_t seed) {
    Tensor<fp8_e4m3> codes(Shape{rows, cols});
    r1::Rng rng(seed);
    for (int64_t i = 0; i < codes.numel(); ++i)
      codes.data()[i] = fp8_e4m3::from_float(static_cast<float>(static_cast<int>(rng.next_u64() % 7) - 3));
    return codes;
  };
  const auto random_scales = [](Shape shape, uint64_t seed) {
    Tensor<float> s(shape);
    r1::Rng rng(seed);
    r1::fill_uniform(s.view(), rng, 0.001, 0.01);
    return s;
  };
  const std::tuple<int64_t, int64_t, int64_t> shapes[] = {{37, 300, 384}, {1, 129, 128}, {1100, 2100, 256}};
  for (const auto& [m_rows, n_cols, k_dim] : shapes) {
    INFO("M " << m_rows << ", N " << n_cols << ", K " << k_dim);
    const Quantized a{small_codes(m_rows, k_dim, 7), random_scales(r1::fp8_tile_scale_shape(Shape{m_rows, k_dim}), 8)};
    const Quantized w{small_codes(n_cols, k_dim, 9), random_scales(r1::fp8_scale_shape(Shape{n_cols, k_dim}), 10)};
    Tensor<float> expected(Shape{m_rows, n_cols});
    r1::fp8_gemm(a.codes, a.scale, w.codes, w.scale, expected.view());
    require_equal(gemm_on_device(a, w).y, expected);
  }
}

TEST_CASE("cuda fp8: GEMM matches the CPU reference on random data, with tails", "[cuda][fp8]") {
  check_gemm(1, 256, 512, 20);      // one token: 64-row tiles
  check_gemm(37, 300, 384, 21);     // odd M, N not a multiple of 128
  check_gemm(64, 2112, 7168, 22);   // DeepSeek-V3's q_a/kv_a projection, 56 K blocks
  check_gemm(1100, 2100, 256, 23);  // enough tiles for 128-row tiles, tails in M and N
}

TEST_CASE("cuda fp8: Fp8Linear on the device", "[cuda][fp8]") {
  const Tensor<float> w = random_matrix(300, 512, 30, 0.05);
  const r1::Fp8Linear<> host = r1::Fp8Linear<>::from_float(w);
  const r1::Fp8Linear<Cuda> quantized_on_device = r1::Fp8Linear<Cuda>::from_float(to_device(w));
  require_same_bytes(to_host(quantized_on_device.weight), host.weight);
  require_equal(to_host(quantized_on_device.weight_scale_inv), host.weight_scale_inv);

  r1::Fp8Linear<Cuda> device;
  r1::copy_params(host, device);
  Tensor<float> x(Shape{3, 5, 512});
  r1::Rng rng(31);
  r1::fill_normal(x.view(), rng);
  Tensor<float> expected(Shape{3, 5, 300});
  r1::apply(host, x, expected.view());
  Tensor<float, Cuda> y(Shape{3, 5, 300});
  r1::Fp8Activations<Cuda> scratch;
  r1::apply(device, to_device(x), y.view(), scratch);
  REQUIRE(scratch.scale.shape() == Shape{15, 4});

  // The device quantized x to the CPU's bytes, so only the GEMM bound applies.
  const Quantized a = quantize_on_host(to_tensor(x.view().reshape(Shape{15, 512})), false);
  require_same_bytes(to_host(scratch.codes), a.codes);
  const Tensor<double> sums = absolute_sums(a, Quantized{host.weight, host.weight_scale_inv});
  const Tensor<float> got = to_host(y);
  for (int64_t i = 0; i < got.numel(); ++i) REQUIRE(std::abs(double(got.data()[i]) - expected.data()[i]) <= 0x1p-11 * sums.data()[i]);

  Tensor<bf16, Cuda> y16(Shape{3, 5, 300});
  r1::apply(device, to_device(x), y16.view());
  const Tensor<bf16> got16 = to_host(y16);
  for (int64_t i = 0; i < got.numel(); ++i) REQUIRE(got16.data()[i] == bf16::from_float(got.data()[i]));
}

TEST_CASE("cuda fp8: errors", "[cuda][fp8]") {
  const Quantized a = quantize_on_host(random_matrix(4, 200, 40), false);
  const Quantized w = quantize_on_host(random_matrix(130, 200, 41), true);
  const Tensor<fp8_e4m3, Cuda> a_codes = to_device(a.codes), w_codes = to_device(w.codes);
  const Tensor<float, Cuda> a_scale = to_device(a.scale), w_scale = to_device(w.scale);
  Tensor<float, Cuda> y(Shape{4, 130});
  REQUIRE_R1_ERROR(r1::fp8_gemm<Cuda>(a_codes, a_scale, w_codes, w_scale, y.view()),
                   "[fp8.gemm] K = 200 must be a positive multiple of 128 on CUDA");
  Tensor<float, Cuda> y_wrong(Shape{4, 129});
  REQUIRE_R1_ERROR(r1::fp8_gemm<Cuda>(a_codes, a_scale, w_codes, w_scale, y_wrong.view()),
                   "[fp8.gemm] y has shape [4, 129], expected [4, 130]");
  REQUIRE_R1_ERROR(r1::fp8_gemm<Cuda>(a_codes, w_scale, w_codes, w_scale, y.view()),
                   "[fp8.gemm] a_scale has shape [2, 2], expected [4, 2]");
  Tensor<fp8_e4m3, Cuda> codes(Shape{4, 100});
  Tensor<float, Cuda> scale(Shape{4, 2});
  REQUIRE_R1_ERROR(r1::quantize_fp8_tiles<Cuda>(to_device(random_matrix(4, 200, 42)), codes.view(), scale.view()),
                   "[fp8.quantize_tiles] codes has shape [4, 100], expected [4, 200]");
}
