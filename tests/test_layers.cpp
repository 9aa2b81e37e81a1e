// Tests for r1/linear.hpp, r1/embedding.hpp, r1/norm.hpp and r1/mlp.hpp: PyTorch golden
// fixtures, finite differences in double, bad input, and thread-count determinism.
#include <r1/embedding.hpp>
#include <r1/linear.hpp>
#include <r1/mlp.hpp>
#include <r1/norm.hpp>

#include "support.hpp"

#include <array>

using r1::Shape;
using r1::Tensor;
using r1test::check_gradient;
using r1test::max_abs_diff;
using r1test::random_tensor;
using r1test::tensor;
using r1test::weighted_sum;

constexpr double kFixtureTolerance = 1e-12;

// --------------------------------------------------------------------------------------
TEST_CASE("linear matches PyTorch, with and without bias", "[linear]") {
  for (const char* name : {"linear", "linear_nobias"}) {
    INFO(name);
    const auto& c = r1test::fixture(name);
    const bool with_bias = c.contains("bias");
    auto x = tensor(c, "x");
    r1::Linear<double> lin;
    lin.weight = tensor(c, "weight");
    if (with_bias) lin.bias = tensor(c, "bias");
    r1::LinearCache<double> cache;
    REQUIRE(max_abs_diff(r1::forward(lin, x, cache), tensor(c, "y")) < kFixtureTolerance);
    auto grads = r1::zeros_like(lin);
    const auto& dx = r1::backward(lin, cache, tensor(c, "dy"), grads);
    REQUIRE(max_abs_diff(dx, tensor(c, "dx")) < kFixtureTolerance);
    REQUIRE(max_abs_diff(grads.weight, tensor(c, "dweight")) < kFixtureTolerance);
    if (with_bias) REQUIRE(max_abs_diff(grads.bias, tensor(c, "dbias")) < kFixtureTolerance);
  }
}

TEST_CASE("linear backward matches finite differences and accumulates", "[linear]") {
  r1::Linear<double> lin(5, 3, /*with_bias=*/true);
  lin.weight = random_tensor(Shape{3, 5}, 1);
  lin.bias = random_tensor(Shape{3}, 2);
  auto x = random_tensor(Shape{2, 4, 5}, 3);  // leading dims flatten into rows
  const auto w = random_tensor(Shape{2, 4, 3}, 4);
  r1::LinearCache<double> cache;
  const auto loss = [&] { return weighted_sum(r1::forward(lin, x, cache), w); };
  loss();
  auto grads = r1::zeros_like(lin);
  const Tensor<double> dx = r1::backward(lin, cache, w, grads);
  check_gradient(x, dx, loss);
  check_gradient(lin.weight, grads.weight, loss);
  check_gradient(lin.bias, grads.bias, loss);

  // A second backward adds the same gradient again.
  Tensor<double> twice = grads.weight;
  twice.matrix() *= 2.0;
  loss();
  r1::backward(lin, cache, w, grads);
  REQUIRE(max_abs_diff(grads.weight, twice) < 1e-12);

  // Inference without a cache gives the same y.
  Tensor<double> y(Shape{2, 4, 3});
  r1::apply(lin, x, y);
  REQUIRE(max_abs_diff(y, r1::forward(lin, x, cache)) == 0.0);
}

TEST_CASE("linear rejects bad shapes and a backward without forward", "[linear][errors]") {
  r1::Linear<float> lin(4, 3);
  r1::LinearCache<float> cache;
  auto grads = r1::zeros_like(lin);
  Tensor<float> dy(Shape{2, 3});
  REQUIRE_R1_ERROR(r1::backward(lin, cache, dy, grads), "[linear.backward] the cache holds no forward pass");
  REQUIRE_R1_ERROR(r1::forward(lin, Tensor<float>(Shape{2, 5}), cache), "[linear.forward] x has shape [2, 5], expected last dim 4");
  r1::forward(lin, Tensor<float>(Shape{2, 4}), cache);
  REQUIRE_R1_ERROR(r1::backward(lin, cache, Tensor<float>(Shape{3, 3}), grads), "[linear.backward] dy has shape [3, 3], expected [2, 3]");
  r1::Linear<float> other(5, 3);
  REQUIRE_R1_ERROR(r1::backward(lin, cache, dy, other), "[linear.backward] grads have weight [3, 5]");
  REQUIRE_R1_ERROR(r1::Linear<float>(0, 3), "[linear] in_features 0 and out_features 3 must be positive");
  REQUIRE_R1_ERROR(r1::forward(r1::Linear<float>{}, Tensor<float>(Shape{2, 4}), cache), "[linear.forward] weight has shape [0]");
  Tensor<float> y(Shape{2, 4});
  REQUIRE_R1_ERROR(r1::apply(lin, Tensor<float>(Shape{2, 4}), y), "[linear.apply] y has shape [2, 4], expected [2, 3]");
}

TEST_CASE("gemm matches a plain triple loop: row and column bands, outer products, accumulate", "[linear]") {
  r1::Rng rng(8);
  for (auto [m, k, n] : {std::array<int64_t, 3>{1, 300, 70}, {70, 1, 33}, {33, 5, 1}, {130, 40, 20}, {20, 40, 130}}) {
    INFO("m " << m << " k " << k << " n " << n);
    Tensor<double> a(Shape{m, k}), b(Shape{n, k}), c(Shape{m, n});
    r1::fill_normal(a.view(), rng);
    r1::fill_normal(b.view(), rng);
    r1::fill_normal(c.view(), rng);
    Tensor<double> expected = c;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t q = 0; q < k; ++q) expected(i, j) += a(i, q) * b(j, q);
    for (int threads : {1, 2, 3}) {
      r1::set_num_threads(threads);
      Tensor<double> accumulated = c;
      r1::gemm(a.matrix(), b.matrix().transpose(), accumulated.matrix(), /*accumulate=*/true);
      REQUIRE(max_abs_diff(accumulated, expected) < 1e-12);
      Tensor<double> assigned = c;
      r1::gemm(a.matrix(), b.matrix().transpose(), assigned.matrix());
      assigned.matrix() += c.matrix();
      REQUIRE(max_abs_diff(assigned, expected) < 1e-12);
    }
  }
  Tensor<double> a(Shape{2, 3}), b(Shape{4, 2});
  REQUIRE_R1_ERROR(r1::gemm(a.matrix(), b.matrix(), a.matrix()), "[gemm] cannot multiply 2x3 by 4x2 into 2x3");
  r1::set_num_threads(2);
}

TEST_CASE("float gemm (r1's SGEMM on AVX-512) matches float64 for transposes, strided blocks, tails and K blocks",
          "[linear][simd]") {
  INFO("R1_SIMD_SGEMM " << R1_SIMD_SGEMM);
  r1::Rng rng(12);
  // Tails of the 6 x 64 register tile and of the 256-deep K blocks, a single row or column,
  // K = 0 and K = 1; every operand may be transposed; C is a column block of a wider matrix.
  // Untransposed B with whole vectors of columns is read in place when its rows are close
  // ({7, 144, 300}: several panels and K blocks, an A tail) and packed when they are not
  // ({3, 1040, 5}: rows 1042 floats apart).
  const std::array<int64_t, 3> shapes[] = {{1, 1, 1},    {6, 64, 256},  {7, 65, 257}, {5, 17, 3},   {130, 200, 520},
                                           {64, 48, 512}, {1, 300, 700}, {300, 1, 40}, {40, 9, 0},   {33, 130, 1},
                                           {7, 144, 300}, {3, 1040, 5}};
  for (auto [m, n, k] : shapes) {
    for (int transposes = 0; transposes < 4; ++transposes) {
      const bool ta = transposes & 1, tb = transposes & 2;
      INFO("m " << m << " n " << n << " k " << k << " ta " << ta << " tb " << tb);
      Tensor<float> a(ta ? Shape{k, m + 3} : Shape{m, k + 3}), b(tb ? Shape{n, k + 2} : Shape{k, n + 2}), c(Shape{m, n + 5});
      r1::fill_normal(a.view(), rng);
      r1::fill_normal(b.view(), rng);
      r1::fill_normal(c.view(), rng);
      const auto a_m = ta ? a.view().slice(1, 0, m) : a.view().slice(1, 0, k);  // row stride past the block
      const auto b_m = tb ? b.view().slice(1, 0, k) : b.view().slice(1, 0, n);
      const auto a_at = [&](int64_t i, int64_t q) { return double(ta ? a(q, i) : a(i, q)); };
      const auto b_at = [&](int64_t q, int64_t j) { return double(tb ? b(j, q) : b(q, j)); };
      std::vector<double> expected(static_cast<std::size_t>(m * n));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double sum = c(i, j + 2);
          for (int64_t q = 0; q < k; ++q) sum += a_at(i, q) * b_at(q, j);
          expected[static_cast<std::size_t>(i * n + j)] = sum;
        }
      const auto am = a_m.matrix();
      const auto bm = b_m.matrix();
      const auto product = [&](auto&& out, bool accumulate) {
        if (ta && tb) r1::gemm(am.transpose(), bm.transpose(), out, accumulate);
        if (ta && !tb) r1::gemm(am.transpose(), bm, out, accumulate);
        if (!ta && tb) r1::gemm(am, bm.transpose(), out, accumulate);
        if (!ta && !tb) r1::gemm(am, bm, out, accumulate);
      };
      Tensor<float> first;
      for (int threads : {1, 2, 3}) {
        r1::set_num_threads(threads);
        Tensor<float> out = c;
        product(out.matrix().middleCols(2, n), /*accumulate=*/true);
        double worst = 0.0;
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) worst = std::max(worst, std::abs(out(i, j + 2) - expected[static_cast<std::size_t>(i * n + j)]));
          // The columns beside the block are untouched.
          REQUIRE(out(i, 0) == c(i, 0));
          REQUIRE(out(i, 1) == c(i, 1));
          for (int64_t j = n + 2; j < n + 5; ++j) REQUIRE(out(i, j) == c(i, j));
        }
        REQUIRE(worst < 1e-5 * (1.0 + std::sqrt(double(k)) * 4.0));
        if (threads == 1) {
          first = out;
        } else {
#if !defined(R1_USE_OPENBLAS)
          REQUIRE(max_abs_diff(first, out) == 0.0);
#endif
        }
      }
      // Without accumulate the old contents of the block do not matter. Few-row products
      // take the lane kernel there, whose sums are ordered differently (close, not equal);
      // more rows give the same bits as accumulating into zeros.
      Tensor<float> assigned(Shape{m, n}), reassigned(Shape{m, n}), accumulated(Shape{m, n});
      r1::fill_normal(assigned.view(), rng);
      r1::fill_normal(reassigned.view(), rng, 5.0);
      accumulated.set_zero();
      product(assigned.matrix(), false);
      product(reassigned.matrix(), false);
      product(accumulated.matrix(), true);
      REQUIRE(max_abs_diff(assigned, reassigned) == 0.0);
      REQUIRE(max_abs_diff(assigned, accumulated) < 1e-5 * (1.0 + std::sqrt(double(k)) * 4.0));
#if R1_SIMD_SGEMM
      if (m > r1::simd::kLanes) REQUIRE(max_abs_diff(assigned, accumulated) == 0.0);
#endif
    }
  }
  r1::set_num_threads(2);
}

TEST_CASE("linear gives bit-identical results on 1, 2 and 3 threads", "[linear][parallel]") {
  // Odd sizes, inner dimensions past Eigen's cache blocking, and single tokens: shapes where
  // Eigen's own threading (and OpenBLAS's) would change the summation order.
  for (auto [m, k, n] : {std::array<int64_t, 3>{300, 256, 192}, {300, 700, 900}, {37, 1000, 515}, {64, 3000, 48}, {17, 64, 40},
                         {1, 2048, 300}, {5, 17, 3}}) {
    INFO("m " << m << " k " << k << " n " << n);
    r1::Linear<float> lin(k, n, true);
    r1::Rng rng(9);
    r1::fill_normal(lin.weight.view(), rng, 0.0, 0.05);
    r1::fill_normal(lin.bias.view(), rng);
    Tensor<float> x(Shape{m, k}), dy(Shape{m, n});
    r1::fill_normal(x.view(), rng);
    r1::fill_normal(dy.view(), rng);
    Tensor<float> y[3], dx[3], dw[3];
    for (int threads : {1, 2, 3}) {
      r1::set_num_threads(threads);
      r1::LinearCache<float> cache;
      auto grads = r1::zeros_like(lin);
      y[threads - 1] = r1::forward(lin, x, cache);
      dx[threads - 1] = r1::backward(lin, cache, dy, grads);
      dw[threads - 1] = grads.weight;
    }
    for (int t : {1, 2}) {
#if defined(R1_USE_OPENBLAS)
      // OpenBLAS threads itself and re-blocks by thread count: only closeness holds.
      REQUIRE(max_abs_diff(y[0], y[t]) < 1e-3);
#else
      REQUIRE(max_abs_diff(y[0], y[t]) == 0.0);
      REQUIRE(max_abs_diff(dx[0], dx[t]) == 0.0);
      REQUIRE(max_abs_diff(dw[0], dw[t]) == 0.0);
#endif
    }
  }
  r1::set_num_threads(2);
}

TEST_CASE("layers accept an empty batch, as PyTorch does", "[linear][norm][mlp]") {
  r1::Linear<float> lin(4, 3, true);
  r1::LinearCache<float> cache;
  REQUIRE(r1::forward(lin, Tensor<float>(Shape{0, 4}), cache).shape() == Shape{0, 3});
  auto grads = r1::zeros_like(lin);
  REQUIRE(r1::backward(lin, cache, Tensor<float>(Shape{0, 3}), grads).shape() == Shape{0, 4});
  REQUIRE(grads.weight.matrix().cwiseAbs().sum() == 0.0f);
  r1::RMSNorm<float> norm(4);
  r1::RMSNormCache<float> norm_cache;
  REQUIRE(r1::forward(norm, Tensor<float>(Shape{2, 0, 4}), norm_cache).shape() == Shape{2, 0, 4});
  r1::Mlp<float> mlp(4, 6);
  r1::MlpCache<float> mlp_cache;
  REQUIRE(r1::forward(mlp, Tensor<float>(Shape{0, 4}), mlp_cache).shape() == Shape{0, 4});
}

// --------------------------------------------------------------------------------------
TEST_CASE("embedding matches PyTorch, repeated ids accumulate", "[embedding]") {
  const auto& c = r1test::fixture("embedding");
  r1::Embedding<double> emb;
  emb.weight = tensor(c, "weight");
  const auto ids = tensor<int32_t>(c, "ids");
  r1::EmbeddingCache<double> cache;
  REQUIRE(max_abs_diff(r1::forward(emb, ids, cache), tensor(c, "y")) == 0.0);
  auto grads = r1::zeros_like(emb);
  r1::backward(emb, cache, tensor(c, "dy"), grads);
  REQUIRE(max_abs_diff(grads.weight, tensor(c, "dweight")) < kFixtureTolerance);
}

TEST_CASE("embedding backward matches finite differences; bad ids throw", "[embedding][errors]") {
  r1::Embedding<double> emb(6, 4);
  emb.weight = random_tensor(Shape{6, 4}, 5);
  Tensor<int32_t> ids(Shape{2, 3});
  const int32_t values[] = {0, 5, 2, 2, 5, 1};
  std::copy(values, values + 6, ids.data());
  const auto w = random_tensor(Shape{2, 3, 4}, 6);
  r1::EmbeddingCache<double> cache;
  const auto loss = [&] { return weighted_sum(r1::forward(emb, ids, cache), w); };
  loss();
  auto grads = r1::zeros_like(emb);
  r1::backward(emb, cache, w, grads);
  check_gradient(emb.weight, grads.weight, loss);

  ids(1, 1) = 6;
  REQUIRE_R1_ERROR(r1::forward(emb, ids, cache), "[embedding.forward] id 6 at position 4 is out of range [0, 6)");
  ids(1, 1) = -1;
  REQUIRE_R1_ERROR(r1::forward(emb, ids, cache), "[embedding.forward] id -1 at position 4");
  REQUIRE_R1_ERROR(r1::Embedding<double>(0, 4), "[embedding] vocab_size 0 and dim 4 must be positive");
  REQUIRE_R1_ERROR(r1::forward(r1::Embedding<double>{}, ids, cache), "[embedding.forward] weight has shape [0], expected [V, D]");
  r1::EmbeddingCache<double> fresh;
  REQUIRE_R1_ERROR(r1::backward(emb, fresh, w, grads), "[embedding.backward] the cache holds no forward pass");
}

// --------------------------------------------------------------------------------------
TEST_CASE("rmsnorm matches PyTorch", "[norm]") {
  const auto& c = r1test::fixture("rmsnorm");
  r1::RMSNorm<double> norm(8, c.at("eps").get<double>());
  norm.weight = tensor(c, "weight");
  r1::RMSNormCache<double> cache;
  REQUIRE(max_abs_diff(r1::forward(norm, tensor(c, "x"), cache), tensor(c, "y")) < kFixtureTolerance);
  auto grads = r1::zeros_like(norm);
  REQUIRE(max_abs_diff(r1::backward(norm, cache, tensor(c, "dy"), grads), tensor(c, "dx")) < kFixtureTolerance);
  REQUIRE(max_abs_diff(grads.weight, tensor(c, "dweight")) < kFixtureTolerance);
}

TEST_CASE("rmsnorm backward matches finite differences; bad input throws", "[norm][errors]") {
  r1::RMSNorm<double> norm(6);
  REQUIRE(norm.weight.vector().sum() == 6.0);  // starts at ones
  norm.weight = random_tensor(Shape{6}, 7);
  auto x = random_tensor(Shape{3, 2, 6}, 8);
  const auto w = random_tensor(Shape{3, 2, 6}, 9);
  r1::RMSNormCache<double> cache;
  const auto loss = [&] { return weighted_sum(r1::forward(norm, x, cache), w); };
  loss();
  auto grads = r1::zeros_like(norm);
  const Tensor<double> dx = r1::backward(norm, cache, w, grads);
  check_gradient(x, dx, loss);
  check_gradient(norm.weight, grads.weight, loss);

  REQUIRE_R1_ERROR(r1::forward(norm, Tensor<double>(Shape{2, 5}), cache), "[rmsnorm.forward] x has shape [2, 5], expected last dim 6");
  REQUIRE_R1_ERROR(r1::RMSNorm<double>(4, 0.0), "[rmsnorm] eps is 0, expected > 0");
  REQUIRE_R1_ERROR(r1::RMSNorm<double>(0), "[rmsnorm] dim is 0, expected > 0");
  REQUIRE_R1_ERROR(r1::forward(r1::RMSNorm<double>{}, Tensor<double>(Shape{2, 0}), cache), "[rmsnorm.forward] the norm has no weight");
  REQUIRE_R1_ERROR(r1::backward(norm, cache, Tensor<double>(Shape{6}), grads), "[rmsnorm.backward] dy has shape [6]");
}

// --------------------------------------------------------------------------------------
TEST_CASE("swiglu mlp matches PyTorch", "[mlp]") {
  const auto& c = r1test::fixture("swiglu");
  r1::Mlp<double> mlp(8, 12);
  mlp.w1.weight = tensor(c, "w1");
  mlp.w2.weight = tensor(c, "w2");
  mlp.w3.weight = tensor(c, "w3");
  r1::MlpCache<double> cache;
  REQUIRE(max_abs_diff(r1::forward(mlp, tensor(c, "x"), cache), tensor(c, "y")) < kFixtureTolerance);
  auto grads = r1::zeros_like(mlp);
  REQUIRE(max_abs_diff(r1::backward(mlp, cache, tensor(c, "dy"), grads), tensor(c, "dx")) < kFixtureTolerance);
  REQUIRE(max_abs_diff(grads.w1.weight, tensor(c, "dw1")) < kFixtureTolerance);
  REQUIRE(max_abs_diff(grads.w2.weight, tensor(c, "dw2")) < kFixtureTolerance);
  REQUIRE(max_abs_diff(grads.w3.weight, tensor(c, "dw3")) < kFixtureTolerance);
}

TEST_CASE("swiglu mlp backward matches finite differences; visit uses HF names", "[mlp]") {
  r1::Mlp<double> mlp(4, 6);
  mlp.w1.weight = random_tensor(Shape{6, 4}, 10);
  mlp.w2.weight = random_tensor(Shape{4, 6}, 11);
  mlp.w3.weight = random_tensor(Shape{6, 4}, 12);
  auto x = random_tensor(Shape{3, 4}, 13);
  const auto w = random_tensor(Shape{3, 4}, 14);
  r1::MlpCache<double> cache;
  const auto loss = [&] { return weighted_sum(r1::forward(mlp, x, cache), w); };
  loss();
  auto grads = r1::zeros_like(mlp);
  const Tensor<double> dx = r1::backward(mlp, cache, w, grads);
  check_gradient(x, dx, loss);
  check_gradient(mlp.w1.weight, grads.w1.weight, loss);
  check_gradient(mlp.w2.weight, grads.w2.weight, loss);
  check_gradient(mlp.w3.weight, grads.w3.weight, loss);

  std::vector<std::string> names;
  mlp.visit([&](const std::string& name, Tensor<double>&) { names.push_back(name); });
  REQUIRE(names == std::vector<std::string>{"gate_proj.weight", "down_proj.weight", "up_proj.weight"});

  r1::Mlp<double> broken(4, 6);
  broken.w2 = r1::Linear<double>(5, 4);
  REQUIRE_R1_ERROR(r1::forward(broken, x, cache), "[mlp.forward] inconsistent weights");
}
