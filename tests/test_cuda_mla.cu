// Tests for r1/cuda/mla.cuh (needs a GPU): the flash training attention (forward and
// backward), the absorbed decode over the paged latent cache, and the cache on the device,
// each against MlaImpl<Cpu> / MlaKvCache<float> on the same random inputs.
#include <r1/cuda/mla.cuh>

#include "support.hpp"

#include <vector>

using r1::Cpu;
using r1::Cuda;
using r1::Shape;
using r1::Tensor;

namespace {

r1::MlaConfig mla_config(int64_t heads, int64_t kv_lora, int64_t nope, int64_t rope, int64_t v) {
  r1::MlaConfig c;
  c.dim = 32;
  c.num_attention_heads = heads;
  c.kv_lora_rank = kv_lora;
  c.qk_nope_head_dim = nope;
  c.qk_rope_head_dim = rope;
  c.v_head_dim = v;
  c.max_position_embeddings = 4096;
  // YaRN, so the softmax scale carries mscale^2.
  c.rope.factor = 4.0;
  c.rope.original_max_position_embeddings = 1024;
  c.rope.mscale = 1.0;
  c.rope.mscale_all_dim = 1.0;
  return c;
}

Tensor<float> random(Shape shape, r1::Rng& rng, double std = 1.0) {
  Tensor<float> t(shape);
  r1::fill_normal(t.view(), rng, 0.0, std);
  return t;
}

Tensor<float, Cuda> to_device(const Tensor<float>& host) {
  Tensor<float, Cuda> device(host.shape());
  r1::copy(host.view(), device.view());
  return device;
}

template <class T>
Tensor<T> to_host(r1::View<const T, Cuda> device) {
  Tensor<T> host(device.shape());
  r1::copy(device, host.view());
  return host;
}

// max |gpu - cpu| relative to max(1, max |cpu|).
double relative_error(const Tensor<float>& gpu, const Tensor<float>& cpu) {
  double scale = 1.0;
  for (int64_t i = 0; i < cpu.numel(); ++i) scale = std::max(scale, static_cast<double>(std::abs(cpu.data()[i])));
  return r1test::max_abs_diff(gpu, cpu) / scale;
}

// A host Mla and its device copy.
struct Params {
  r1::Mla<float> host;
  r1::Mla<float, Cuda> device;
  Params(const r1::MlaConfig& cfg, r1::Rng& rng) : host(cfg), device(cfg) {
    host.visit([&](const std::string&, auto& t) { r1::fill_normal(t.view(), rng, 0.0, 0.2); });
    r1::copy_params(host, device);
  }
};

void check_training_attention(const r1::MlaConfig& cfg, int64_t B, int64_t S, uint64_t seed) {
  INFO("B " << B << ", S " << S << ", H " << cfg.num_attention_heads << ", Dq " << cfg.qk_head_dim() << ", V "
            << cfg.v_head_dim);
  r1::Rng rng(seed);
  Params p(cfg, rng);
  const int64_t H = cfg.num_attention_heads, N = cfg.qk_nope_head_dim, R = cfg.qk_rope_head_dim, V = cfg.v_head_dim,
                Dq = N + R;
  r1::MlaCache<float> hc;
  r1::MlaCache<float, Cuda> dc;
  hc.batch = dc.batch = B;
  hc.seq = dc.seq = S;
  hc.q_rot = random(Shape{B * S, H, Dq}, rng);
  hc.kv_b.y = random(Shape{B, S, H * (N + V)}, rng);
  hc.k_pe = random(Shape{B * S, R}, rng);
  hc.o.dx = random(Shape{B, S, H * V}, rng);
  dc.q_rot = to_device(hc.q_rot);
  dc.kv_b.y = to_device(hc.kv_b.y);
  dc.k_pe = to_device(hc.k_pe);
  dc.o.dx = to_device(hc.o.dx);
  hc.attn.resize(Shape{B, S, H * V});
  dc.attn.resize(Shape{B, S, H * V});

  r1::MlaImpl<Cpu>::attention_forward(p.host, hc);
  r1::MlaImpl<Cuda>::attention_forward(p.device, dc);
  CHECK(relative_error(to_host<float>(dc.attn), hc.attn) < 2e-5);

  hc.dq.resize(Shape{B * S, H, Dq});
  hc.dkv.resize(Shape{B, S, H * (N + V)});
  hc.dk_pe.resize(Shape{B * S, R});
  dc.dq.resize(Shape{B * S, H, Dq});
  dc.dkv.resize(Shape{B, S, H * (N + V)});
  dc.dk_pe.resize(Shape{B * S, R});
  r1::MlaImpl<Cpu>::attention_backward(p.host, hc);
  r1::MlaImpl<Cuda>::attention_backward(p.device, dc);
  CHECK(relative_error(to_host<float>(dc.dq), hc.dq) < 1e-4);
  CHECK(relative_error(to_host<float>(dc.dkv), hc.dkv) < 1e-4);
  CHECK(relative_error(to_host<float>(dc.dk_pe), hc.dk_pe) < 1e-4);
}

// Host and device caches with the same sequences: `lengths[i] - Tn` tokens appended in two
// rounds over all sequences (so block tables interleave), then Tn more each.
struct Caches {
  r1::MlaKvCache<float> host;
  r1::MlaKvCache<float, Cuda> device;
  Caches(const r1::MlaConfig& cfg, int64_t num_blocks) : host(cfg, num_blocks), device(cfg, num_blocks) {}

  void append(int64_t seq, int64_t n, r1::Rng& rng) {
    const Tensor<float> latent = random(Shape{n, host.kv_lora_rank()}, rng), k_pe = random(Shape{n, host.rope_dim()}, rng);
    host.append(seq, latent, k_pe);
    device.append(seq, to_device(latent), to_device(k_pe));
  }

  void require_same_contents() {
    REQUIRE(device.num_sequences() == host.num_sequences());
    REQUIRE(device.free_blocks() == host.free_blocks());
    for (int64_t s = 0; s < host.num_sequences(); ++s) {
      REQUIRE(device.length(s) == host.length(s));
      REQUIRE(device.block_table(s) == host.block_table(s));
      for (int64_t i = 0; i < host.num_blocks_of(s); ++i)
        REQUIRE(r1test::max_abs_diff(to_host<float>(device.block(s, i)), r1::to_tensor(host.block(s, i))) == 0.0);
    }
  }
};

void check_absorbed_decode(const std::vector<int64_t>& lengths, int64_t Tn, uint64_t seed) {
  INFO("T " << Tn);
  // DeepSeek-V3's latent shape (C 512, R 64) with few, small heads.
  const r1::MlaConfig cfg = mla_config(3, 512, 16, 64, 24);
  r1::Rng rng(seed);
  Params p(cfg, rng);
  const int64_t B = static_cast<int64_t>(lengths.size()), H = cfg.num_attention_heads, V = cfg.v_head_dim;
  int64_t num_blocks = 0;
  for (int64_t length : lengths) num_blocks += (length + 63) / 64 + 1;
  Caches kv(cfg, num_blocks);
  for (int64_t b = 0; b < B; ++b) {
    REQUIRE(kv.host.add_sequence() == b);
    REQUIRE(kv.device.add_sequence() == b);
  }
  for (int64_t b = 0; b < B; ++b) kv.append(b, (lengths[b] - Tn) / 2, rng);
  for (int64_t b = 0; b < B; ++b) kv.append(b, lengths[b] - Tn - (lengths[b] - Tn) / 2, rng);
  for (int64_t b = 0; b < B; ++b) kv.append(b, Tn, rng);
  kv.require_same_contents();

  // A batch in another order than the ids.
  std::vector<int64_t> seqs;
  for (int64_t b = B - 1; b >= 0; --b) seqs.push_back(b);
  r1::MlaDecodeCache<float> hw;
  r1::MlaDecodeCache<float, Cuda> dw;
  hw.q = random(Shape{B * Tn, H, cfg.qk_head_dim()}, rng);
  dw.q = to_device(hw.q);
  hw.attn.resize(Shape{B, Tn, H * V});
  dw.attn.resize(Shape{B, Tn, H * V});
  r1::MlaImpl<Cpu>::absorbed_attention(p.host, kv.host, seqs, Tn, hw);
  r1::MlaImpl<Cuda>::absorbed_attention(p.device, kv.device, seqs, Tn, dw);
  CHECK(relative_error(to_host<float>(dw.olat), hw.olat) < 1e-4);
  CHECK(relative_error(to_host<float>(dw.attn), hw.attn) < 1e-4);
}

}  // namespace

TEST_CASE("cuda mla: flash attention forward and backward match the CPU", "[cuda][mla]") {
  // Dq = 26 and V = 18: rows that are not whole float4s; 3 heads.
  const r1::MlaConfig odd = mla_config(3, 16, 20, 6, 18);
  for (int64_t S : {1, 7, 32, 65, 130}) check_training_attention(odd, 2, S, 100 + S);
  // DeepSeek-V3's head shape: Dq = 192 (8 column slots), V = 128.
  check_training_attention(mla_config(2, 32, 128, 64, 128), 2, 65, 7);
}

TEST_CASE("cuda mla: absorbed decode over the paged cache matches the CPU", "[cuda][mla]") {
  check_absorbed_decode({1, 63, 64, 65, 300}, 1, 11);
  check_absorbed_decode({3, 63, 64, 65, 300}, 3, 12);  // 3 new tokens each: causal among them
}

TEST_CASE("cuda mla: the split decode keeps a long sequence exact", "[cuda][mla]") {
  // One sequence of 40 blocks: many splits, so the LSE combine carries the result.
  check_absorbed_decode({2560 - 7}, 1, 13);
}

TEST_CASE("cuda mla: the latent cache appends, truncates and resets like the CPU one", "[cuda][mla]") {
  const r1::MlaConfig cfg = mla_config(2, 512, 16, 64, 16);
  r1::Rng rng(21);
  Caches kv(cfg, 8);
  for (int i = 0; i < 3; ++i) {
    kv.host.add_sequence();
    kv.device.add_sequence();
  }
  kv.append(0, 70, rng);
  kv.append(1, 1, rng);
  kv.append(2, 64, rng);
  kv.append(1, 129, rng);
  kv.require_same_contents();
  kv.host.truncate(1, 65);
  kv.device.truncate(1, 65);
  kv.host.reset(0);
  kv.device.reset(0);
  kv.require_same_contents();
  kv.append(0, 5, rng);
  kv.append(1, 63, rng);  // fills block 1 of sequence 1, then one more
  kv.require_same_contents();
  REQUIRE(kv.device.bytes_in_use() == kv.host.bytes_in_use());
  kv.host.reset();
  kv.device.reset();
  kv.require_same_contents();
  REQUIRE(kv.device.free_blocks() == 8);
}

TEST_CASE("cuda mla: cache errors are the CPU's", "[cuda][mla]") {
  r1::MlaConfig cfg = mla_config(2, 512, 16, 64, 16);
  cfg.max_position_embeddings = 100;
  r1::MlaKvCache<float, Cuda> kv(cfg, 2);
  const int64_t seq = kv.add_sequence();
  const Tensor<float, Cuda> latent(Shape{101, 512}), k_pe(Shape{101, 64});
  REQUIRE_R1_ERROR(kv.append(seq, latent, k_pe), "past max_position_embeddings 100");
  const int64_t other = kv.add_sequence();
  kv.append(seq, latent.view().slice(0, 0, 70), k_pe.view().slice(0, 0, 70));
  REQUIRE_R1_ERROR(kv.append(other, latent.view().slice(0, 0, 65), k_pe.view().slice(0, 0, 65)),
                   "[mla_kv_cache.append] the pool is full: sequence 1 needs 2 more blocks of 64 tokens, 0 of 2 are free");
  REQUIRE(kv.length(other) == 0);
  const Tensor<float, Cuda> wrong(Shape{3, 500});
  REQUIRE_R1_ERROR(kv.append(other, wrong, k_pe.view().slice(0, 0, 3)), "[mla_kv_cache.append] latent has shape [3, 500]");
  REQUIRE_R1_ERROR(kv.truncate(seq, 71), "[mla_kv_cache.truncate] length 71 is outside [0, 70]");
  REQUIRE_R1_ERROR(kv.length(5), "sequence 5 does not exist");
}

TEST_CASE("cuda mla: decode rejects shapes the kernel does not cover", "[cuda][mla]") {
  const r1::MlaConfig cfg = mla_config(2, 1024, 16, 64, 16);
  r1::MlaKvCache<float, Cuda> kv(cfg, 2);
  kv.add_sequence();
  r1::MlaDecodeCache<float, Cuda> w;
  r1::MlaImpl<Cuda>::stage_block_tables(kv, {0}, w);
  w.qcat.resize(Shape{1, 2, 1024 + 64});
  REQUIRE_R1_ERROR(r1::MlaImpl<Cuda>::latent_attention(kv, 2, 1, 1.0, w),
                   "[mla.latent_attention] kv_lora_rank 1024 and qk_rope_head_dim 64 must be multiples of 4");
}
