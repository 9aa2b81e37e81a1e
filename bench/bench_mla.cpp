// bench_mla: Multi-head Latent Attention (r1/mla.hpp) in float: training throughput, and
// decode throughput and memory bandwidth with the absorbed latent cache vs a naive
// per-head K/V cache.
//
// What is measured
//   mla_train            r1::forward + r1::backward over x [batch, seq, dim] (causal), with
//                        reused caches: tokens_per_s = batch * seq / time.
//   mla_decode_absorbed  one r1::forward_absorbed step of batch sequences that each hold
//                        `context` cached tokens (the step appends one and the timed loop
//                        truncates it again): tokens_per_s = batch / time.
//   mla_decode_naive     the same step with a per-head K/V cache ([L, H, N+R] and
//                        [L, H, V] per sequence), written here with the layer's Linears.
//   gbps = bytes one step must read / time, with bytes = the layer's weights + the cache
//   (absorbed: batch * L * (C+R) * 4; naive: batch * L * H * (N+R+V) * 4);
//   efficiency = gbps / the STREAM-triad bandwidth measured at the start of the run
//   (a[i] = b[i] + s c[i] over 3 x 128 MB, counted as 12 bytes per element).
//
// Output: one JSON object per line on stdout (progress on stderr), e.g.
//   {"name":"stream_triad","threads":2,"gbps":61.3}
//   {"name":"mla_decode_absorbed","shape":{...},"threads":2,"tokens_per_s":...,"gbps":...,"efficiency":...}
//
// Usage: bench_mla [--quick] [--threads 1,2] [--mode train|decode --dim D --heads H --q-lora Q
//                  --kv-lora C --nope N --rope R --v V --batch B --seq S --context L]
//   With --mode, only that case runs (decode runs absorbed and naive); without it the
//   default cases run: train at dim 512, heads 8, q_lora 192, kv_lora 128, nope 32, rope
//   16, v 32, batch 4, seq 512; decode at the V2-Lite shape (dim 2048, heads 16, q_lora 0,
//   kv_lora 512, nope 128, rope 64, v 128), batch 1 and 8, context 1K, 4K and 16K.
#include "common.hpp"

#include <r1/mla.hpp>
#include <r1/parallel.hpp>

#include <fmt/format.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

namespace {

struct Case {
  std::string mode = "train";
  r1::MlaConfig cfg;
  int64_t batch = 4, seq = 512, context = 1024;
};

struct Options {
  bool quick = false;
  bool custom = false;
  Case single;
  std::vector<int> threads{1, 2};
};

[[noreturn]] void usage(const char* argv0, int code) {
  std::fprintf(stderr,
               "usage: %s [--quick] [--threads 1,2] [--mode train|decode --dim D --heads H --q-lora Q --kv-lora C "
               "--nope N --rope R --v V --batch B --seq S --context L]\n",
               argv0);
  std::exit(code);
}

r1::MlaConfig make_config(int64_t dim, int64_t heads, int64_t q_lora, int64_t kv_lora, int64_t nope, int64_t rope,
                          int64_t v) {
  r1::MlaConfig c;
  c.dim = dim;
  c.num_attention_heads = heads;
  c.q_lora_rank = q_lora;
  c.kv_lora_rank = kv_lora;
  c.qk_nope_head_dim = nope;
  c.qk_rope_head_dim = rope;
  c.v_head_dim = v;
  c.max_position_embeddings = 1 << 20;
  return c;
}

Options parse(int argc, char** argv) {
  Options o;
  o.single.cfg = make_config(512, 8, 192, 128, 32, 16, 32);
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    const auto value = [&]() -> int64_t {
      if (i + 1 >= argc) usage(argv[0], 2);
      return std::atoll(argv[++i]);
    };
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--mode" && i + 1 < argc) {
      o.single.mode = argv[++i];
      if (o.single.mode != "train" && o.single.mode != "decode") usage(argv[0], 2);
      o.custom = true;
    } else if (a == "--dim") {
      o.single.cfg.dim = value();
    } else if (a == "--heads") {
      o.single.cfg.num_attention_heads = value();
    } else if (a == "--q-lora") {
      o.single.cfg.q_lora_rank = value();
    } else if (a == "--kv-lora") {
      o.single.cfg.kv_lora_rank = value();
    } else if (a == "--nope") {
      o.single.cfg.qk_nope_head_dim = value();
    } else if (a == "--rope") {
      o.single.cfg.qk_rope_head_dim = value();
    } else if (a == "--v") {
      o.single.cfg.v_head_dim = value();
    } else if (a == "--batch") {
      o.single.batch = value();
    } else if (a == "--seq") {
      o.single.seq = value();
    } else if (a == "--context") {
      o.single.context = value();
    } else if (a == "--threads" && i + 1 < argc) {
      o.threads = r1::bench::parse_thread_list(argv[++i]);
      if (o.threads.empty()) usage(argv[0], 2);
    } else if (a == "--help" || a == "-h") {
      usage(argv[0], 0);
    } else {
      usage(argv[0], 2);
    }
  }
  return o;
}

std::string shape_json(const Case& c) {
  const auto& f = c.cfg;
  return fmt::format(
      "{{\"dim\":{},\"heads\":{},\"q_lora\":{},\"kv_lora\":{},\"nope\":{},\"rope\":{},\"v\":{},\"batch\":{},\"{}\":{}}}",
      f.dim, f.num_attention_heads, f.q_lora_rank, f.kv_lora_rank, f.qk_nope_head_dim, f.qk_rope_head_dim, f.v_head_dim,
      c.batch, c.mode == "train" ? "seq" : "context", c.mode == "train" ? c.seq : c.context);
}

// STREAM triad, GB/s (best of repeats), on `threads` threads through r1::parallel_for.
double stream_triad_gbps(int threads, int repeats) {
  r1::set_num_threads(threads);
  const int64_t n = int64_t{32} << 20;  // 128 MB per array
  std::vector<float> a(n), b(n, 1.0f), c(n, 2.0f);
  double best = 0;
  for (int r = 0; r < repeats + 1; ++r) {
    const double t0 = r1::bench::now_seconds();
    r1::parallel_for(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) a[i] = b[i] + 3.0f * c[i];
    });
    const double dt = r1::bench::now_seconds() - t0;
    if (r > 0) best = std::max(best, 12.0 * static_cast<double>(n) / dt * 1e-9);
  }
  volatile float sink = a[n / 2];
  (void)sink;
  return best;
}

r1::Mla<float> random_layer(const r1::MlaConfig& cfg) {
  r1::Mla<float> p(cfg);
  r1::Rng rng(7);
  p.visit([&](const std::string& name, r1::Tensor<float>& w) {
    if (name.find("layernorm") == std::string::npos) r1::fill_uniform(w.view(), rng, -0.02, 0.02);
  });
  return p;
}

int64_t weight_bytes(r1::Mla<float>& p) {
  int64_t n = 0;
  p.visit([&](const std::string&, r1::Tensor<float>& w) { n += w.numel(); });
  return n * 4;
}

// Fills with cheap pseudo-random values in [-1, 1) (an LCG; the values do not matter).
void fill_fast(float* p, int64_t n, uint32_t seed) {
  for (int64_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    p[i] = static_cast<float>(seed >> 8) * (2.0f / 16777216.0f) - 1.0f;
  }
}

// A decode step with a per-head K/V cache: what MLA looks like without absorption.
struct NaiveDecode {
  const r1::Mla<float>& p;
  int64_t B, L;  // L = context + 1 (the new token)
  r1::Tensor<float> k, v;  // [B, L, H, N+R], [B, L, H, V]
  r1::Tensor<float> qa, q, kva, kpe, kv, probs, attn, y;
  r1::RMSNormCache<float> q_norm, kv_norm;
  r1::Tensor<int32_t> positions;

  NaiveDecode(const r1::Mla<float>& layer, int64_t batch, int64_t context) : p(layer), B(batch), L(context + 1) {
    const auto& c = p.config;
    const int64_t H = c.num_attention_heads;
    k.resize(r1::Shape{B, L, H, c.qk_head_dim()});
    v.resize(r1::Shape{B, L, H, c.v_head_dim});
    fill_fast(k.data(), k.numel(), 1);
    fill_fast(v.data(), v.numel(), 2);
    positions.resize(r1::Shape{B});
    for (int64_t b = 0; b < B; ++b) positions.data()[b] = static_cast<int32_t>(context);
  }

  void step(const r1::Tensor<float>& x) {  // x [B, 1, D]
    const auto& c = p.config;
    const int64_t H = c.num_attention_heads, N = c.qk_nope_head_dim, R = c.qk_rope_head_dim, V = c.v_head_dim,
                  C = c.kv_lora_rank, Dq = N + R, Dkv = N + V;
    q.resize(r1::Shape{B, H, Dq});
    const r1::View<float> q3(q.data(), r1::Shape{B, 1, H * Dq});
    if (p.has_q_lora()) {
      qa.resize(r1::Shape{B, 1, c.q_lora_rank});
      r1::apply(p.q_a, x, qa.view());
      r1::apply(p.q_b, r1::forward(p.q_norm, qa, q_norm), q3);
    } else {
      r1::apply(p.q, x, q3);
    }
    auto q_pe = q.view().slice(2, N, Dq);
    r1::forward(p.rope, q_pe, positions, q_pe);
    kva.resize(r1::Shape{B, C + R});
    r1::apply(p.kv_a, x, r1::View<float>(kva.data(), r1::Shape{B, 1, C + R}));
    kpe.resize(r1::Shape{B, R});
    r1::forward(p.rope, kva.view().slice(1, C, C + R), positions, kpe.view());
    kv.resize(r1::Shape{B, H * Dkv});
    r1::apply(p.kv_b, r1::forward(p.kv_norm, kva.view().slice(1, 0, C), kv_norm), kv.view());
    // Expand the new token into every head's K and V.
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        float* kd = k.data() + ((b * L + L - 1) * H + h) * Dq;
        float* vd = v.data() + ((b * L + L - 1) * H + h) * V;
        for (int64_t i = 0; i < N; ++i) kd[i] = kv(b, h * Dkv + i);
        for (int64_t i = 0; i < R; ++i) kd[N + i] = kpe(b, i);
        for (int64_t i = 0; i < V; ++i) vd[i] = kv(b, h * Dkv + N + i);
      }
    probs.resize(r1::Shape{B, H, L});
    attn.resize(r1::Shape{B, 1, H * V});
    const float scale = static_cast<float>(p.softmax_scale());
    r1::parallel_for(B * H, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const r1::MatrixMap<const float> kb(k.data() + b * L * H * Dq + h * Dq, L, Dq, Eigen::OuterStride<>(H * Dq));
        const r1::MatrixMap<const float> vb(v.data() + b * L * H * V + h * V, L, V, Eigen::OuterStride<>(H * V));
        auto pr = probs.matrix().row(bh);
        pr.noalias() = q.matrix().row(bh) * kb.transpose();
        pr *= scale;
        pr = (pr.array() - pr.maxCoeff()).exp().matrix();
        pr /= pr.sum();
        attn.matrix().row(b).segment(h * V, V).noalias() = pr * vb;
      }
    });
    y.resize(r1::Shape{B, 1, c.dim});
    r1::apply(p.o, attn, y.view());
  }
};

void emit(const char* name, const Case& c, int threads, double tokens_per_s, double gbps, double stream,
          const std::pair<r1::bench::Stats, double>& m) {
  std::string extra;
  if (gbps > 0) extra = fmt::format(",\"gbps\":{:.1f},\"efficiency\":{:.3f}", gbps, stream > 0 ? gbps / stream : 0.0);
  fmt::print("{{\"name\":\"{}\",\"shape\":{},\"threads\":{},\"tokens_per_s\":{:.1f}{},\"best_ms\":{:.4f},"
             "\"median_ms\":{:.4f},\"repeats\":{},\"others_cpu\":{:.2f}}}\n",
             name, shape_json(c), threads, tokens_per_s, extra, m.first.best * 1e3, m.first.median * 1e3,
             m.first.repeats, m.second);
  std::fflush(stdout);
}

void run_train(const Case& c, int threads, const r1::bench::TimingPlan& plan) {
  r1::set_num_threads(threads);
  auto p = random_layer(c.cfg);
  auto grads = r1::zeros_like(p);
  r1::Tensor<float> x(r1::Shape{c.batch, c.seq, c.cfg.dim}), dy(x.shape());
  fill_fast(x.data(), x.numel(), 3);
  fill_fast(dy.data(), dy.numel(), 4);
  r1::Tensor<int32_t> positions(r1::Shape{c.seq});
  for (int64_t i = 0; i < c.seq; ++i) positions.data()[i] = static_cast<int32_t>(i);
  r1::MlaCache<float> cache;
  const auto m = r1::bench::least_disturbed([&] {
    return r1::bench::time_calls([&] {
      r1::forward(p, x, positions, cache);
      r1::backward(p, cache, dy, grads);
    }, plan);
  });
  emit("mla_train", c, threads, static_cast<double>(c.batch * c.seq) / m.first.best, 0, 0, m);
}

void run_decode(const Case& c, int threads, double stream, const r1::bench::TimingPlan& plan) {
  r1::set_num_threads(threads);
  auto p = random_layer(c.cfg);
  const int64_t C = c.cfg.kv_lora_rank, R = c.cfg.qk_rope_head_dim, H = c.cfg.num_attention_heads;
  r1::Tensor<float> x(r1::Shape{c.batch, 1, c.cfg.dim});
  fill_fast(x.data(), x.numel(), 5);
  const int64_t wbytes = weight_bytes(p);
  {
    const int64_t per_seq = (c.context + 1 + 63) / 64;
    r1::MlaKvCache<float> kv(c.cfg, c.batch * per_seq, 64);
    r1::MlaDecodeCache<float> ws;
    std::vector<int64_t> seqs;
    r1::Tensor<float> lat(r1::Shape{1024, C}), pe(r1::Shape{1024, R});
    fill_fast(lat.data(), lat.numel(), 6);
    fill_fast(pe.data(), pe.numel(), 7);
    for (int64_t b = 0; b < c.batch; ++b) {
      seqs.push_back(kv.add_sequence());
      for (int64_t t = 0; t < c.context; t += 1024) {
        const int64_t n = std::min<int64_t>(1024, c.context - t);
        kv.append(seqs.back(), lat.view().slice(0, 0, n), pe.view().slice(0, 0, n));
      }
    }
    const auto m = r1::bench::least_disturbed([&] {
      return r1::bench::time_calls([&] {
        r1::forward_absorbed(p, x, seqs, kv, ws);
        for (int64_t s : seqs) kv.truncate(s, c.context);
      }, plan);
    });
    const double bytes = static_cast<double>(wbytes + c.batch * (c.context + 1) * kv.bytes_per_token());
    emit("mla_decode_absorbed", c, threads, static_cast<double>(c.batch) / m.first.best, bytes / m.first.best * 1e-9,
         stream, m);
  }
  {
    NaiveDecode naive(p, c.batch, c.context);
    const auto m = r1::bench::least_disturbed([&] { return r1::bench::time_calls([&] { naive.step(x); }, plan); });
    const double bytes = static_cast<double>(wbytes) + 4.0 * static_cast<double>(c.batch * (c.context + 1) * H *
                                                                                  (c.cfg.qk_head_dim() + c.cfg.v_head_dim));
    emit("mla_decode_naive", c, threads, static_cast<double>(c.batch) / m.first.best, bytes / m.first.best * 1e-9, stream,
         m);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  r1::bench::start(argv, false);

  std::vector<Case> cases;
  if (opt.custom) {
    cases.push_back(opt.single);
  } else {
    Case train;
    train.cfg = make_config(512, 8, 192, 128, 32, 16, 32);
    cases.push_back(train);
    for (int64_t batch : {1, 8})
      for (int64_t context : {1024, 4096, 16384}) {
        Case d;
        d.mode = "decode";
        d.cfg = make_config(2048, 16, 0, 512, 128, 64, 128);
        d.batch = batch;
        d.context = context;
        cases.push_back(d);
      }
  }
  r1::bench::TimingPlan plan;
  if (opt.quick) {
    plan.budget_s = 0.08;
    plan.min_repeats = 2;
  }
  std::vector<double> stream(opt.threads.size());
  for (std::size_t i = 0; i < opt.threads.size(); ++i) {
    stream[i] = stream_triad_gbps(opt.threads[i], opt.quick ? 3 : 8);
    fmt::print("{{\"name\":\"stream_triad\",\"threads\":{},\"gbps\":{:.1f}}}\n", opt.threads[i], stream[i]);
    std::fflush(stdout);
  }
  for (const Case& c : cases) {
    for (std::size_t i = 0; i < opt.threads.size(); ++i) {
      std::fprintf(stderr, "%s %s threads=%d ...\n", c.mode.c_str(), shape_json(c).c_str(), opt.threads[i]);
      if (c.mode == "train") {
        run_train(c, opt.threads[i], plan);
      } else {
        run_decode(c, opt.threads[i], stream[i], plan);
      }
    }
  }
  return 0;
}
