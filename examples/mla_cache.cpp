// mla_cache: why DeepSeek caches latents. Prints the KV-cache size per token and for a 32K
// context at the real DeepSeek-V3 shape, MLA's latent cache next to a per-head MHA cache,
// then runs one small MLA layer both ways (training path with per-head K/V, and absorbed
// decode over the paged latent cache) and shows that the outputs agree.
#include <r1/mla.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

int main() {
  // ---- DeepSeek-V3: 61 layers, 128 heads, latent 512 + RoPE 64, head dims 128/64/128, bf16.
  r1::MlaConfig v3;
  v3.dim = 7168;
  v3.num_attention_heads = 128;
  v3.q_lora_rank = 1536;
  v3.kv_lora_rank = 512;
  v3.qk_nope_head_dim = 128;
  v3.qk_rope_head_dim = 64;
  v3.v_head_dim = 128;
  v3.max_position_embeddings = 163840;
  const int64_t layers = 61, context = 32768;
  const r1::MlaKvCache<r1::bf16> one_block(v3, /*num_blocks=*/1);  // the cache itself says what a token costs
  const int64_t mla_bytes = layers * one_block.bytes_per_token();
  // MHA caches K (nope + rope) and V for every head.
  const int64_t mha_bytes =
      layers * v3.num_attention_heads * (v3.qk_head_dim() + v3.v_head_dim) * static_cast<int64_t>(sizeof(r1::bf16));
  fmt::print("DeepSeek-V3 KV cache, bf16, {} layers:\n", layers);
  fmt::print("  MLA latent ({} + {} per layer):   {:>10} B/token  {:>7.2f} GiB at {} tokens\n", v3.kv_lora_rank,
             v3.qk_rope_head_dim, mla_bytes, static_cast<double>(mla_bytes * context) / (1 << 30), context);
  fmt::print("  MHA per-head K/V ({} x ({} + {})): {:>10} B/token  {:>7.2f} GiB at {} tokens\n", v3.num_attention_heads,
             v3.qk_head_dim(), v3.v_head_dim, mha_bytes, static_cast<double>(mha_bytes * context) / (1 << 30), context);
  fmt::print("  ratio: {:.1f}x smaller\n\n", static_cast<double>(mha_bytes) / static_cast<double>(mla_bytes));

  // ---- A small layer, both ways.
  r1::MlaConfig cfg;
  cfg.dim = 64;
  cfg.num_attention_heads = 4;
  cfg.q_lora_rank = 32;
  cfg.kv_lora_rank = 32;
  cfg.qk_nope_head_dim = 16;
  cfg.qk_rope_head_dim = 8;
  cfg.v_head_dim = 16;
  r1::Mla<float> mla(cfg);
  r1::Rng rng(0);
  mla.visit([&](const std::string& name, r1::Tensor<float>& w) {
    if (name.find("layernorm") == std::string::npos) r1::fill_normal(w.view(), rng, 0.0, 0.1);
  });
  const int64_t seq = 24, prompt = 16;
  r1::Tensor<float> x(r1::Shape{1, seq, cfg.dim});
  r1::fill_normal(x.view(), rng);
  r1::Tensor<int32_t> positions(r1::Shape{seq});
  for (int64_t i = 0; i < seq; ++i) positions.data()[i] = static_cast<int32_t>(i);

  r1::MlaCache<float> train_cache;
  const r1::Tensor<float> reference = r1::forward(mla, x, positions, train_cache);  // per-head K and V

  r1::MlaKvCache<float> kv(cfg, /*num_blocks=*/4, /*block_size=*/8);
  r1::MlaDecodeCache<float> ws;
  const int64_t id = kv.add_sequence();
  r1::Tensor<float> absorbed(r1::Shape{1, seq, cfg.dim});
  const auto& y0 = r1::forward_absorbed(mla, r1::to_tensor(x.view().slice(1, 0, prompt)), {id}, kv, ws);  // prefill
  absorbed.view().select(0).slice(0, 0, prompt).matrix() = y0.matrix();
  for (int64_t t = prompt; t < seq; ++t) {  // decode, one token at a time
    const auto& y = r1::forward_absorbed(mla, r1::to_tensor(x.view().slice(1, t, t + 1)), {id}, kv, ws);
    absorbed.view().select(0).slice(0, t, t + 1).matrix() = y.matrix();
  }
  double diff = 0.0, scale = 0.0;
  for (int64_t i = 0; i < reference.numel(); ++i) {
    diff = std::max(diff, static_cast<double>(std::abs(absorbed.data()[i] - reference.data()[i])));
    scale = std::max(scale, static_cast<double>(std::abs(reference.data()[i])));
  }
  fmt::print("Small layer (dim {}, {} heads, latent {} + {}), {} tokens: prefill {} then decode {} one at a time\n", cfg.dim,
             cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, seq, prompt, seq - prompt);
  fmt::print("  cache: {} tokens in {} blocks of {}, {} B/token, {} B held\n", kv.length(id), kv.block_table(id).size(),
             kv.block_size(), kv.bytes_per_token(), kv.bytes_in_use());
  fmt::print("  max |absorbed - training| = {:.3g} (max |y| = {:.3g}, relative {:.3g}): {}\n", diff, scale, diff / scale,
             diff <= 1e-5 * scale ? "the same outputs, to float rounding" : "MISMATCH");
  return diff <= 1e-5 * scale ? 0 : 1;
}
