// bench_moe: tokens/s and GFLOP/s of r1's DeepSeekMoE layer, against a dense GEMM of the
// same FLOPs measured in the same run.
//
// What is measured
//   moe.fwd      r1::forward(moe, x, cache)                         F flops per call
//   moe.fwd_bwd  forward, then r1::backward(moe, cache, dy, grads)  3F flops per call
//   F = tokens * (k * 6*D*H  +  n_shared * 6*D*H  +  2*D*E): the routed experts, the shared
//   experts and the gate. Routing, gather, combine and the losses are overhead on top.
//   dense.fwd / dense.fwd_bwd: r1::Linear over x[tokens, D] with N = F / (2 * tokens * D)
//   outputs, forward (and backward): one GEMM per pass with the same FLOPs. efficiency =
//   moe gflops / dense gflops, so 1.0 means routing costs nothing beyond the matmuls.
//   The default cases are the issue's: tokens 512 and 4096; dim 512 with 16 experts of
//   hidden 256, 2 shared, top-4; dim 2048 with 64 experts of hidden 1408, 2 shared, top-6,
//   8 groups, top-3 groups; on 1 and 2 threads. Expert load is near uniform: the gate and
//   x are random.
//
// Output: one JSON object per line on stdout (notes on stderr), e.g.
//   {"name":"moe.fwd_bwd","tokens":512,"dim":512,"experts":16,"hidden":256,"shared":2,"topk":4,
//    "groups":1,"topk_groups":1,"threads":2,"tokens_per_s":...,"gflops":...,"efficiency":...}
//
// Usage: bench_moe [--quick] [--tokens T --dim D --experts E --hidden H --shared S --topk K
//                  --groups G --topk-groups TG] [--threads 1,2]
//   Any shape flag replaces the default cases with that one case.
#include "common.hpp"

#include <r1/linear.hpp>
#include <r1/moe.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

struct Case {
  int64_t tokens, dim, experts, hidden, shared, topk, groups, topk_groups;
};

struct Options {
  bool quick = false;
  std::vector<int> threads{1, 2};
  std::vector<Case> cases{
      {512, 512, 16, 256, 2, 4, 1, 1},
      {4096, 512, 16, 256, 2, 4, 1, 1},
      {512, 2048, 64, 1408, 2, 6, 8, 3},
      {4096, 2048, 64, 1408, 2, 6, 8, 3},
  };
};

[[noreturn]] void usage(const char* argv0, int code) {
  std::fprintf(stderr,
               "usage: %s [--quick] [--tokens T --dim D --experts E --hidden H --shared S --topk K --groups G "
               "--topk-groups TG] [--threads 1,2]\n",
               argv0);
  std::exit(code);
}

Options parse(int argc, char** argv) {
  Options o;
  Case custom = o.cases[0];
  bool has_custom = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    const auto value = [&] {
      if (i + 1 >= argc) usage(argv[0], 2);
      const long v = std::atol(argv[++i]);
      if (v < 1) usage(argv[0], 2);
      return static_cast<int64_t>(v);
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--threads" && i + 1 < argc) {
      o.threads = r1::bench::parse_thread_list(argv[++i]);
      if (o.threads.empty()) usage(argv[0], 2);
    } else if (a == "--tokens") {
      custom.tokens = value(), has_custom = true;
    } else if (a == "--dim") {
      custom.dim = value(), has_custom = true;
    } else if (a == "--experts") {
      custom.experts = value(), has_custom = true;
    } else if (a == "--hidden") {
      custom.hidden = value(), has_custom = true;
    } else if (a == "--shared") {
      custom.shared = value(), has_custom = true;
    } else if (a == "--topk") {
      custom.topk = value(), has_custom = true;
    } else if (a == "--groups") {
      custom.groups = value(), has_custom = true;
    } else if (a == "--topk-groups") {
      custom.topk_groups = value(), has_custom = true;
    } else if (a == "--help" || a == "-h") {
      usage(argv[0], 0);
    } else {
      usage(argv[0], 2);
    }
  }
  if (has_custom) o.cases = {custom};
  return o;
}

void emit(const char* name, const Case& c, int threads, double flops, double seconds, double dense_gflops, double others) {
  const double gflops = flops / seconds * 1e-9;
  fmt::print(
      "{{\"name\":\"{}\",\"tokens\":{},\"dim\":{},\"experts\":{},\"hidden\":{},\"shared\":{},\"topk\":{},\"groups\":{},"
      "\"topk_groups\":{},\"threads\":{},\"tokens_per_s\":{:.0f},\"gflops\":{:.1f},\"efficiency\":{:.3f},"
      "\"others_cpu\":{:.2f}}}\n",
      name, c.tokens, c.dim, c.experts, c.hidden, c.shared, c.topk, c.groups, c.topk_groups, threads,
      static_cast<double>(c.tokens) / seconds, gflops, dense_gflops > 0 ? gflops / dense_gflops : 1.0, others);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  r1::bench::start(argv, false);
  r1::bench::TimingPlan plan;
  if (opt.quick) {
    plan.budget_s = 0.1;
    plan.min_repeats = 2;
  }

  for (const Case& c : opt.cases) {
    r1::MoeConfig cfg;
    cfg.dim = c.dim;
    cfg.n_routed_experts = c.experts;
    cfg.moe_intermediate_size = c.hidden;
    cfg.n_shared_experts = c.shared;
    cfg.num_experts_per_tok = c.topk;
    cfg.n_group = c.groups;
    cfg.topk_group = c.topk_groups;
    cfg.topk_method = c.groups > 1 ? r1::TopkMethod::NoAuxTc : r1::TopkMethod::Greedy;
    cfg.routed_scaling_factor = 2.5;
    r1::Moe<float> moe(cfg);
    r1::Rng rng(3);
    moe.visit([&](const std::string&, r1::Tensor<float>& w) { r1::fill_uniform(w.view(), rng, -0.05, 0.05); });
    r1::Moe<float> grads = r1::zeros_like(moe);
    r1::Tensor<float> x(r1::Shape{c.tokens, c.dim}), dy(r1::Shape{c.tokens, c.dim});
    r1::fill_uniform(x.view(), rng, -1.0, 1.0);
    r1::fill_uniform(dy.view(), rng, -1.0, 1.0);
    r1::MoeCache<float> cache;

    const double flops = static_cast<double>(c.tokens) *
                         (static_cast<double>(c.topk + c.shared) * 6.0 * c.dim * c.hidden + 2.0 * c.dim * c.experts);
    const int64_t dense_out = std::max<int64_t>(1, static_cast<int64_t>(flops / (2.0 * c.tokens * c.dim) + 0.5));
    r1::Linear<float> dense(c.dim, dense_out);
    r1::fill_uniform(dense.weight.view(), rng, -0.05, 0.05);
    r1::Linear<float> dense_grads = r1::zeros_like(dense);
    r1::Tensor<float> dense_dy(r1::Shape{c.tokens, dense_out});
    r1::fill_uniform(dense_dy.view(), rng, -1.0, 1.0);
    r1::LinearCache<float> dense_cache;
    const double dense_flops = 2.0 * c.tokens * c.dim * dense_out;

    for (int threads : opt.threads) {
      r1::set_num_threads(threads);
      std::fprintf(stderr, "tokens=%ld dim=%ld experts=%ld threads=%d ...\n", static_cast<long>(c.tokens),
                   static_cast<long>(c.dim), static_cast<long>(c.experts), threads);
      const auto dense_fwd = r1::bench::least_disturbed(
          [&] { return r1::bench::time_calls([&] { r1::forward(dense, x, dense_cache); }, plan); });
      const auto dense_fwd_bwd = r1::bench::least_disturbed([&] {
        return r1::bench::time_calls([&] {
          r1::forward(dense, x, dense_cache);
          r1::backward(dense, dense_cache, dense_dy, dense_grads);
        }, plan);
      });
      const auto fwd = r1::bench::least_disturbed(
          [&] { return r1::bench::time_calls([&] { r1::forward(moe, x, cache); }, plan); });
      const auto fwd_bwd = r1::bench::least_disturbed([&] {
        return r1::bench::time_calls([&] {
          r1::forward(moe, x, cache);
          r1::backward(moe, cache, dy, grads);
        }, plan);
      });
      const double dense_fwd_gflops = dense_flops / dense_fwd.first.best * 1e-9;
      const double dense_fwd_bwd_gflops = 3.0 * dense_flops / dense_fwd_bwd.first.best * 1e-9;
      emit("dense.fwd", c, threads, dense_flops, dense_fwd.first.best, dense_fwd_gflops,
           dense_fwd.second);
      emit("dense.fwd_bwd", c, threads, 3.0 * dense_flops, dense_fwd_bwd.first.best, dense_fwd_bwd_gflops,
           dense_fwd_bwd.second);
      emit("moe.fwd", c, threads, flops, fwd.first.best, dense_fwd_gflops, fwd.second);
      emit("moe.fwd_bwd", c, threads, 3.0 * flops, fwd_bwd.first.best, dense_fwd_bwd_gflops, fwd_bwd.second);
    }
  }
  return 0;
}
