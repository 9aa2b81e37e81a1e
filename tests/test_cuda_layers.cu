// Tests for the dense CUDA specializations (needs a GPU): cuda_gemm, Linear, Mlp, RMSNorm,
// AdamW and clip_grad_norm against their CPU paths on random inputs.
//
// fp32 results must match the CPU within 1e-5 of the reference's largest magnitude (the
// sums run in another order, nothing else differs). bf16 inputs are rounded to bf16 on the
// host, so both sides multiply the same numbers; the GPU then rounds its outputs (and, in
// the MLP, its intermediates) to bf16, 2^-9 relative each, hence 1e-2 (2e-2 for the MLP).
#include <r1/cuda/linear.cuh>
#include <r1/cuda/mlp.cuh>
#include <r1/cuda/norm.cuh>
#include <r1/cuda/optim.cuh>

#include "support.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

using r1::bf16;
using r1::Cuda;
using r1::Shape;
using r1::Tensor;

namespace {

Tensor<float> random(Shape shape, uint64_t seed, double std = 1.0, double mean = 0.0) {
  Tensor<float> t(shape);
  r1::Rng rng(seed);
  r1::fill_normal(t.view(), rng, mean, std);
  return t;
}

// The values T can hold: bf16 rounds, float keeps them.
template <class T>
void round_to(Tensor<float>& t) {
  if constexpr (std::is_same_v<T, bf16>)
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = bf16::from_float(t.data()[i]).to_float();
}

template <class T>
Tensor<T, Cuda> to_device(const Tensor<float>& host) {
  Tensor<T> converted(host.shape());
  r1::convert<float, T>(host.view(), converted.view());
  Tensor<T, Cuda> device(host.shape());
  r1::copy(converted.view(), device.view());
  return device;
}

template <class T>
Tensor<float> to_host(r1::ConstView<T, Cuda> device) {
  Tensor<T> host(device.shape());
  r1::copy(device, host.view());
  Tensor<float> out(device.shape());
  r1::convert<T, float>(host.view(), out.view());
  return out;
}

template <class T>
Tensor<float> to_host(const Tensor<T, Cuda>& device) {
  return to_host<T>(device.view());
}

// Every tensor of a host float params struct rounded to T, then onto a device params
// struct built with the same sizes.
template <class T, template <class, class> class Params>
void upload(Params<float, r1::Cpu>& host, Params<T, Cuda>& device) {
  std::vector<Tensor<float>*> sources;
  host.visit([&](const std::string&, Tensor<float>& t) {
    round_to<T>(t);
    sources.push_back(&t);
  });
  std::size_t i = 0;
  device.visit([&](const std::string& name, Tensor<T, Cuda>& t) {
    INFO(name);
    REQUIRE(i < sources.size());
    REQUIRE(t.shape() == sources[i]->shape());
    t = to_device<T>(*sources[i++]);
  });
  REQUIRE(i == sources.size());
}

double max_abs(const Tensor<float>& t) {
  double worst = 0.0;
  for (int64_t i = 0; i < t.numel(); ++i) worst = std::max(worst, std::abs(static_cast<double>(t.data()[i])));
  return worst;
}

// |got - want| <= tolerance * max |want| elementwise.
void require_close(const Tensor<float>& got, const Tensor<float>& want, double tolerance, const std::string& what) {
  INFO(what << ": max |diff| " << r1test::max_abs_diff(got, want) << ", max |reference| " << max_abs(want));
  REQUIRE(r1test::max_abs_diff(got, want) <= tolerance * std::max(max_abs(want), 1e-30));
}

// Every tensor of a device params struct against the host float one, by name.
template <class T, template <class, class> class Params>
void require_params_close(Params<T, Cuda>& device, Params<float, r1::Cpu>& host, double tolerance) {
  std::vector<std::pair<std::string, Tensor<float>*>> expected;
  host.visit([&](const std::string& name, Tensor<float>& t) { expected.emplace_back(name, &t); });
  std::size_t i = 0;
  device.visit([&](const std::string& name, Tensor<T, Cuda>& t) {
    REQUIRE(i < expected.size());
    REQUIRE(expected[i].first == name);
    require_close(to_host(t), *expected[i++].second, tolerance, name);
  });
  REQUIRE(i == expected.size());
}

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, float> ? "float" : "bf16";
}

// ---------------------------------------------------------------------------------------
template <class T>
void check_gemm(int64_t m, int64_t k, int64_t n, bool transpose_a, bool transpose_b, float alpha, bool accumulate) {
  INFO(type_name<T>() << " gemm m " << m << " k " << k << " n " << n << " transpose_a " << transpose_a << " transpose_b "
                      << transpose_b << " alpha " << alpha << " accumulate " << accumulate);
  Tensor<float> a = random(transpose_a ? Shape{k, m} : Shape{m, k}, 11);
  Tensor<float> b = random(transpose_b ? Shape{n, k} : Shape{k, n}, 12);
  Tensor<float> c = random(Shape{m, n}, 13);
  round_to<T>(a);
  round_to<T>(b);
  round_to<T>(c);
  Tensor<T, Cuda> a_d = to_device<T>(a), b_d = to_device<T>(b), c_d = to_device<T>(c);
  r1::cuda_gemm<T>(a_d, b_d, c_d, {.transpose_a = transpose_a, .transpose_b = transpose_b, .alpha = alpha, .accumulate = accumulate});

  Tensor<float> product(Shape{m, n});
  if (transpose_a && transpose_b) {
    r1::gemm(a.matrix().transpose(), b.matrix().transpose(), product.matrix());
  } else if (transpose_a) {
    r1::gemm(a.matrix().transpose(), b.matrix(), product.matrix());
  } else if (transpose_b) {
    r1::gemm(a.matrix(), b.matrix().transpose(), product.matrix());
  } else {
    r1::gemm(a.matrix(), b.matrix(), product.matrix());
  }
  Tensor<float> expected(Shape{m, n});
  expected.matrix() = alpha * product.matrix();
  if (accumulate) expected.matrix() += c.matrix();
  require_close(to_host(c_d), expected, tolerance<T>(), "C");
}

TEST_CASE("cuda_gemm: every op(A) op(B) combination, alpha and accumulate, fp32 and bf16", "[cuda][linear]") {
  for (bool transpose_a : {false, true})
    for (bool transpose_b : {false, true}) {
      check_gemm<float>(37, 45, 29, transpose_a, transpose_b, 1.0f, false);
      check_gemm<float>(64, 128, 96, transpose_a, transpose_b, 0.5f, true);
      check_gemm<bf16>(37, 45, 29, transpose_a, transpose_b, 1.0f, false);
      check_gemm<bf16>(64, 128, 96, transpose_a, transpose_b, -2.0f, true);
    }
}

TEST_CASE("cuda_gemm: an empty inner dimension zeroes C, or leaves it with accumulate", "[cuda][linear]") {
  Tensor<float, Cuda> a(Shape{3, 0}), b(Shape{0, 5});
  Tensor<float, Cuda> c = to_device<float>(random(Shape{3, 5}, 3));
  const Tensor<float> before = to_host(c);
  r1::cuda_gemm<float>(a, b, c, {.accumulate = true});
  REQUIRE(r1test::max_abs_diff(to_host(c), before) == 0.0);
  r1::cuda_gemm<float>(a, b, c);
  REQUIRE(max_abs(to_host(c)) == 0.0);
}

TEST_CASE("cuda_gemm: rank-2 views with a row stride and an unaligned start", "[cuda][linear]") {
  // A = columns [3, 3 + 40) of a [21, 50] matrix: row stride 50, data 12 bytes past 256.
  const Tensor<float> wide = random(Shape{21, 50}, 4);
  const Tensor<float> b = random(Shape{40, 17}, 5);
  Tensor<float, Cuda> wide_d = to_device<float>(wide), b_d = to_device<float>(b);
  Tensor<float, Cuda> c_d(Shape{21, 17});
  r1::cuda_gemm<float>(wide_d.view().slice(1, 3, 43), b_d, c_d);
  Tensor<float> expected(Shape{21, 17});
  r1::gemm(wide.view().slice(1, 3, 43).matrix(), b.matrix(), expected.matrix());
  require_close(to_host(c_d), expected, 1e-5, "C");
}

TEST_CASE("cuda_gemm: shape and layout errors name the op", "[cuda][linear]") {
  Tensor<float, Cuda> a(Shape{4, 5}), b(Shape{6, 7}), c(Shape{4, 7});
  REQUIRE_R1_ERROR(r1::cuda_gemm<float>(a, b, c), "[cuda_gemm] cannot multiply op(A) 4x5 by op(B) 6x7 into C 4x7");
  Tensor<float, Cuda> b_t(Shape{7, 5});
  REQUIRE_R1_ERROR(r1::cuda_gemm<float>(a, b_t, c), "[cuda_gemm] cannot multiply op(A) 4x5 by op(B) 7x5");
  r1::cuda_gemm<float>(a, b_t, c, {.transpose_b = true});  // the same operands, read as they are stored
  Tensor<float, Cuda> big(Shape{2, 4, 10});
  REQUIRE_R1_ERROR(r1::cuda_gemm<float>(big.view().slice(2, 0, 5), b_t, Tensor<float, Cuda>(Shape{2, 4, 7}), {.transpose_b = true}),
                   "[cuda_gemm] A of shape [2, 4, 5] must be contiguous (rank > 2)");
}

// ---------------------------------------------------------------------------------------
template <class T>
void check_linear(Shape x_shape, int64_t out_features, bool with_bias) {
  const int64_t in_features = x_shape[x_shape.rank - 1];
  INFO(type_name<T>() << " linear x " << x_shape.str() << " out " << out_features << " bias " << with_bias);
  r1::Linear<float> host(in_features, out_features, with_bias);
  r1::Rng rng(21);
  r1::fill_normal(host.weight.view(), rng, 0.0, 0.5);
  if (with_bias) r1::fill_normal(host.bias.view(), rng);
  r1::Linear<float> host_grads = r1::zeros_like(host);  // nonzero, to check that backward adds
  r1::fill_normal(host_grads.weight.view(), rng);
  if (with_bias) r1::fill_normal(host_grads.bias.view(), rng);
  Shape y_shape = x_shape;
  y_shape.dims[y_shape.rank - 1] = out_features;
  Tensor<float> x = random(x_shape, 22), dy = random(y_shape, 23);
  round_to<T>(x);
  round_to<T>(dy);

  r1::Linear<T, Cuda> device(in_features, out_features, with_bias);
  upload(host, device);
  r1::Linear<T, Cuda> device_grads = r1::zeros_like(device);
  upload(host_grads, device_grads);

  r1::LinearCache<float> cache;
  const Tensor<float> y = r1::forward(host, x, cache);
  const Tensor<float> dx = r1::backward(host, cache, dy, host_grads);

  r1::LinearCache<T, Cuda> device_cache;
  const Tensor<T, Cuda> x_d = to_device<T>(x), dy_d = to_device<T>(dy);
  require_close(to_host(r1::forward(device, x_d, device_cache)), y, tolerance<T>(), "y");
  require_close(to_host(r1::backward(device, device_cache, dy_d, device_grads)), dx, tolerance<T>(), "dx");
  require_params_close(device_grads, host_grads, tolerance<T>());

  Tensor<T, Cuda> y_apply(y_shape);
  r1::apply(device, x_d, y_apply);
  require_close(to_host(y_apply), y, tolerance<T>(), "apply y");
}

TEST_CASE("cuda linear: forward, backward and apply match the CPU, fp32", "[cuda][linear]") {
  for (int64_t m : {1, 37, 128}) {
    check_linear<float>(Shape{m, 64}, 96, true);
    check_linear<float>(Shape{m, 37}, 53, true);  // K and N not multiples of 8
    check_linear<float>(Shape{m, 45}, 19, false);
  }
  check_linear<float>(Shape{2, 3, 40}, 24, true);  // leading dims flattened into rows
}

TEST_CASE("cuda linear: forward, backward and apply match the CPU, bf16", "[cuda][linear]") {
  for (int64_t m : {1, 37, 128}) {
    check_linear<bf16>(Shape{m, 64}, 96, true);
    check_linear<bf16>(Shape{m, 37}, 53, true);
    check_linear<bf16>(Shape{m, 45}, 19, false);
  }
  check_linear<bf16>(Shape{2, 3, 40}, 24, true);
}

TEST_CASE("cuda linear: apply writes into a column slice of a wider output", "[cuda][linear]") {
  r1::Linear<float> host(24, 10, /*with_bias=*/true);
  r1::Rng rng(31);
  r1::fill_normal(host.weight.view(), rng);
  r1::fill_normal(host.bias.view(), rng);
  r1::Linear<float, Cuda> device(24, 10, /*with_bias=*/true);
  r1::copy_params(host, device);
  const Tensor<float> x = random(Shape{9, 24}, 32);
  Tensor<float> y(Shape{9, 10});
  r1::apply(host, x, y);
  Tensor<float, Cuda> wide(Shape{9, 16});
  r1::apply(device, to_device<float>(x), wide.view().slice(1, 5, 15));
  const Tensor<float> wide_host = to_host(wide);
  require_close(r1::to_tensor(wide_host.view().slice(1, 5, 15)), y, 1e-5, "y");
  REQUIRE(max_abs(r1::to_tensor(wide_host.view().slice(1, 0, 5))) == 0.0);   // untouched
  REQUIRE(max_abs(r1::to_tensor(wide_host.view().slice(1, 15, 16))) == 0.0);
}

TEST_CASE("cuda linear: the bias gradient is the same on every run", "[cuda][linear]") {
  r1::Linear<float, Cuda> device(300, 70, /*with_bias=*/true);
  const Tensor<float, Cuda> x = to_device<float>(random(Shape{1000, 300}, 41));
  const Tensor<float, Cuda> dy = to_device<float>(random(Shape{1000, 70}, 42));
  std::vector<Tensor<float>> bias_grads;
  for (int run = 0; run < 2; ++run) {
    r1::Linear<float, Cuda> grads = r1::zeros_like(device);
    r1::LinearCache<float, Cuda> cache;
    r1::forward(device, x, cache);
    r1::backward(device, cache, dy, grads);
    bias_grads.push_back(to_host(grads.bias));
  }
  REQUIRE(std::equal(bias_grads[0].data(), bias_grads[0].data() + 70, bias_grads[1].data()));
}

TEST_CASE("cuda linear: shape errors name the op", "[cuda][linear]") {
  r1::Linear<float, Cuda> device(8, 4, /*with_bias=*/true);
  r1::Linear<float, Cuda> grads = r1::zeros_like(device);
  r1::LinearCache<float, Cuda> cache;
  REQUIRE_R1_ERROR(r1::forward(device, Tensor<float, Cuda>(Shape{3, 7}), cache),
                   "[linear.forward] x has shape [3, 7], expected last dim 8");
  REQUIRE_R1_ERROR(r1::backward(device, cache, Tensor<float, Cuda>(Shape{3, 4}), grads),
                   "[linear.backward] the cache holds no forward pass");
  r1::forward(device, Tensor<float, Cuda>(Shape{3, 8}), cache);
  REQUIRE_R1_ERROR(r1::backward(device, cache, Tensor<float, Cuda>(Shape{3, 5}), grads),
                   "[linear.backward] dy has shape [3, 5], expected [3, 4]");
  Tensor<float, Cuda> y(Shape{3, 5});
  REQUIRE_R1_ERROR(r1::apply(device, Tensor<float, Cuda>(Shape{3, 8}), y), "[linear.apply] y has shape [3, 5], expected [3, 4]");
}

// ---------------------------------------------------------------------------------------
template <class T>
void check_mlp(int64_t rows, int64_t dim, int64_t hidden, double tol) {
  INFO(type_name<T>() << " mlp rows " << rows << " dim " << dim << " hidden " << hidden);
  r1::Mlp<float> host(dim, hidden);
  r1::Rng rng(51);
  host.visit([&](const std::string&, Tensor<float>& w) { r1::fill_normal(w.view(), rng, 0.0, 0.3); });
  r1::Mlp<float> host_grads = r1::zeros_like(host);
  host_grads.visit([&](const std::string&, Tensor<float>& w) { r1::fill_normal(w.view(), rng); });
  Tensor<float> x = random(Shape{rows, dim}, 52), dy = random(Shape{rows, dim}, 53);
  round_to<T>(x);
  round_to<T>(dy);
  r1::Mlp<T, Cuda> device(dim, hidden);
  upload(host, device);
  r1::Mlp<T, Cuda> device_grads = r1::zeros_like(device);
  upload(host_grads, device_grads);

  r1::MlpCache<float> cache;
  const Tensor<float> y = r1::forward(host, x, cache);
  const Tensor<float> dx = r1::backward(host, cache, dy, host_grads);
  r1::MlpCache<T, Cuda> device_cache;
  require_close(to_host(r1::forward(device, to_device<T>(x), device_cache)), y, tol, "y");
  require_close(to_host(device_cache.down.x), cache.down.x, tol, "h");
  require_close(to_host(r1::backward(device, device_cache, to_device<T>(dy), device_grads)), dx, tol, "dx");
  require_close(to_host(device_cache.dgate), cache.dgate, tol, "dgate");
  require_close(to_host(device_cache.dup), cache.dup, tol, "dup");
  require_params_close(device_grads, host_grads, tol);
}

TEST_CASE("cuda mlp: SwiGLU forward and backward match the CPU", "[cuda][mlp]") {
  for (int64_t rows : {1, 37, 128}) {
    check_mlp<float>(rows, 48, 72, 1e-5);
    check_mlp<float>(rows, 37, 61, 1e-5);
    check_mlp<bf16>(rows, 48, 72, 2e-2);
  }
}

TEST_CASE("cuda mlp: backward before forward is an error", "[cuda][mlp]") {
  r1::Mlp<float, Cuda> device(8, 16);
  r1::Mlp<float, Cuda> grads = r1::zeros_like(device);
  r1::MlpCache<float, Cuda> cache;
  REQUIRE_R1_ERROR(r1::backward(device, cache, Tensor<float, Cuda>(Shape{2, 8}), grads),
                   "[mlp.backward] the cache holds no forward pass");
  REQUIRE_R1_ERROR(r1::forward(device, Tensor<float, Cuda>(Shape{2, 9}), cache), "[linear.forward] x has shape [2, 9]");
}

// ---------------------------------------------------------------------------------------
template <class T>
void check_rmsnorm(Shape x_shape, double tol) {
  const int64_t dim = x_shape[x_shape.rank - 1];
  INFO(type_name<T>() << " rmsnorm x " << x_shape.str());
  r1::RMSNorm<float> host(dim, 1e-5);
  r1::Rng rng(61);
  r1::fill_normal(host.weight.view(), rng, 1.0, 0.2);
  r1::RMSNorm<float> host_grads = r1::zeros_like(host);
  r1::fill_normal(host_grads.weight.view(), rng);
  Tensor<float> x = random(x_shape, 62, 2.0), dy = random(x_shape, 63);
  round_to<T>(x);
  round_to<T>(dy);
  r1::RMSNorm<T, Cuda> device(dim, host.eps);
  upload(host, device);
  r1::RMSNorm<T, Cuda> device_grads = r1::zeros_like(device);
  upload(host_grads, device_grads);

  r1::RMSNormCache<float> cache;
  const Tensor<float> y = r1::forward(host, x, cache);
  const Tensor<float> dx = r1::backward(host, cache, dy, host_grads);
  r1::RMSNormCache<T, Cuda> device_cache;
  require_close(to_host(r1::forward(device, to_device<T>(x), device_cache)), y, tol, "y");
  require_close(to_host(device_cache.rstd), cache.rstd, tol, "rstd");
  require_close(to_host(r1::backward(device, device_cache, to_device<T>(dy), device_grads)), dx, tol, "dx");
  require_params_close(device_grads, host_grads, tol);
}

TEST_CASE("cuda rmsnorm: forward and backward match the CPU", "[cuda][norm]") {
  for (int64_t rows : {1, 37, 300}) {  // 300 rows: several row chunks in the weight gradient
    check_rmsnorm<float>(Shape{rows, 67}, 1e-5);
    check_rmsnorm<float>(Shape{rows, 1000}, 1e-5);  // more columns than threads
    check_rmsnorm<bf16>(Shape{rows, 67}, 1e-2);
  }
  check_rmsnorm<float>(Shape{2, 5, 33}, 1e-5);
}

TEST_CASE("cuda rmsnorm: built on the device with unit weights; deterministic weight gradient", "[cuda][norm]") {
  r1::RMSNorm<float, Cuda> device(40);
  const Tensor<float> weight = to_host(device.weight);
  REQUIRE(std::all_of(weight.data(), weight.data() + 40, [](float w) { return w == 1.0f; }));
  const Tensor<float, Cuda> x = to_device<float>(random(Shape{5000, 40}, 71));
  const Tensor<float, Cuda> dy = to_device<float>(random(Shape{5000, 40}, 72));
  std::vector<Tensor<float>> weight_grads;
  for (int run = 0; run < 2; ++run) {
    r1::RMSNorm<float, Cuda> grads = r1::zeros_like(device);
    r1::RMSNormCache<float, Cuda> cache;
    r1::forward(device, x, cache);
    r1::backward(device, cache, dy, grads);
    weight_grads.push_back(to_host(grads.weight));
  }
  REQUIRE(std::equal(weight_grads[0].data(), weight_grads[0].data() + 40, weight_grads[1].data()));
}

TEST_CASE("cuda rmsnorm: shape errors name the op", "[cuda][norm]") {
  r1::RMSNorm<float, Cuda> device(16);
  r1::RMSNorm<float, Cuda> grads = r1::zeros_like(device);
  r1::RMSNormCache<float, Cuda> cache;
  REQUIRE_R1_ERROR(r1::forward(device, Tensor<float, Cuda>(Shape{3, 15}), cache),
                   "[rmsnorm.forward] x has shape [3, 15], expected last dim 16");
  r1::forward(device, Tensor<float, Cuda>(Shape{3, 16}), cache);
  REQUIRE_R1_ERROR(r1::backward(device, cache, Tensor<float, Cuda>(Shape{4, 16}), grads),
                   "[rmsnorm.backward] dy has shape [4, 16], expected [3, 16]");
}

// ---------------------------------------------------------------------------------------
TEST_CASE("cuda adamw: several steps with weight decay and clipping match the CPU", "[cuda][optim]") {
  r1::Mlp<float> host(24, 40);
  r1::Linear<float> head(24, 7, /*with_bias=*/true);  // a bias: registered without decay
  r1::Rng rng(81);
  host.visit([&](const std::string&, Tensor<float>& w) { r1::fill_normal(w.view(), rng, 0.0, 0.3); });
  head.visit([&](const std::string&, Tensor<float>& w) { r1::fill_normal(w.view(), rng, 0.0, 0.3); });
  r1::Mlp<float> host_grads = r1::zeros_like(host);
  r1::Linear<float> head_grads = r1::zeros_like(head);
  r1::Mlp<float, Cuda> device(24, 40), device_grads(24, 40);
  r1::Linear<float, Cuda> device_head(24, 7, true), device_head_grads(24, 7, true);
  r1::copy_params(host, device);
  r1::copy_params(host_grads, device_grads);
  r1::copy_params(head, device_head);
  r1::copy_params(head_grads, device_head_grads);

  r1::ParameterRegistry<float> params;
  params.add("mlp.", host, host_grads);
  params.add("head.", head, head_grads);
  r1::ParameterRegistry<float, Cuda> device_params;
  device_params.add("mlp.", device, device_grads);
  device_params.add("head.", device_head, device_head_grads);
  REQUIRE(device_params.find("head.bias")->decay == false);
  const r1::AdamWConfig config{.lr = 1e-2, .weight_decay = 0.1};
  r1::AdamW<float> adamw(params, config);
  r1::AdamW<float, Cuda> device_adamw(device_params, config);

  for (int step = 0; step < 6; ++step) {
    INFO("step " << step);
    // Gradients with a global norm of about 2.5 (even steps) or 25 (odd steps): clipping to
    // 10 leaves the first alone and scales the second.
    const double target_norm = step % 2 ? 25.0 : 2.5;
    const double std = target_norm / std::sqrt(static_cast<double>(params.num_parameters()));
    for (std::size_t k = 0; k < params.size(); ++k) {
      Tensor<float>& g = *params.entries()[k].grad;
      r1::fill_normal(g.view(), rng, 0.0, std);
      r1::copy(g.view(), device_params.entries()[k].grad->view());
    }
    const double norm = r1::clip_grad_norm(params, 10.0);
    const double device_norm = r1::clip_grad_norm(device_params, 10.0);
    REQUIRE(std::abs(device_norm - norm) <= 1e-9 * norm);
    REQUIRE((norm > 10.0) == (step % 2 == 1));
    adamw.step(1e-2 * (1.0 + step));
    device_adamw.step(1e-2 * (1.0 + step));
    for (std::size_t k = 0; k < params.size(); ++k) {
      const auto& e = params.entries()[k];
      require_close(to_host(*device_params.entries()[k].grad), *e.grad, 1e-6, e.name + " (clipped grad)");
      require_close(to_host(*device_params.entries()[k].value), *e.value, 1e-5, e.name);
    }
  }
  std::vector<Tensor<float>*> moments;
  adamw.visit_state([&](const std::string&, Tensor<float>& t) { moments.push_back(&t); });
  std::size_t i = 0;
  device_adamw.visit_state([&](const std::string& name, Tensor<float, Cuda>& t) { require_close(to_host(t), *moments[i++], 1e-5, name); });
}

TEST_CASE("cuda clip_grad_norm: the norm of a large tensor, the same on every run", "[cuda][optim]") {
  // 2^19 + 3 elements: more than the 1024 blocks of 256 threads cover in one pass.
  Tensor<float> value(Shape{(1 << 19) + 3}), grad = random(Shape{(1 << 19) + 3}, 91);
  r1::ParameterRegistry<float> params;
  params.add("w", value, grad);
  Tensor<float, Cuda> device_value(value.shape());
  Tensor<float, Cuda> device_grad = to_device<float>(grad);
  r1::ParameterRegistry<float, Cuda> device_params;
  device_params.add("w", device_value, device_grad);
  const double norm = r1::clip_grad_norm(params, 1e9);  // large: nothing clipped
  const double first = r1::clip_grad_norm(device_params, 1e9), second = r1::clip_grad_norm(device_params, 1e9);
  REQUIRE(first == second);
  REQUIRE(std::abs(first - norm) <= 1e-9 * norm);
  REQUIRE_R1_ERROR(r1::clip_grad_norm(device_params, 0.0), "[clip_grad_norm] max_norm is 0, expected > 0");
}

}  // namespace
