// r1/mla.hpp: Multi-head Latent Attention (DeepSeek-V2/V3), training and absorbed inference.
//
// Training path (per-head K and V are materialized):
//   q      = q_b(q_norm(q_a(x)))            or q_proj(x) when q_lora_rank == 0   [B,S,H,Dq]
//   kva    = kv_a(x) = [c_kv | k_pe_raw]                                         [B,S,C+R]
//   ckv    = kv_norm(c_kv)                                                        [B,S,C]
//   kv     = kv_b(ckv) = per head [k_nope | v]                                    [B,S,H,N+V]
//   q_pe   = RoPE(q[..., N:]),  k_pe = RoPE(k_pe_raw)   (k_pe: ONE head shared by all heads)
//   Q[b,h,s] = [q_nope | q_pe],   K[b,h,t] = [k_nope[b,t,h] | k_pe[b,t]],  V[b,h,t] = v[b,t,h]
//   P[b,h]  = softmax(scale * Q K^T, causal: t <= s)                              [S,S]
//   O[b,s,h] = sum_t P[b,h,s,t] V[b,h,t],   y = o_proj(O)                          [B,S,D]
//   scale  = (N+R)^-1/2 * m^2,  m = 0.1 mscale_all_dim ln(factor) + 1 with YaRN (Rope::attention_scale)
// Backward, per (b,h):
//   dP = dO V^T,  dV = P^T dO,  dZ = scale * P * (dP - rowsum(dP * P))
//   dQ = dZ K,    dK = dZ^T Q,  dk_pe = sum over heads of dK[..., N:]
//   then RoPE^T on dq_pe and dk_pe, and the Linear / RMSNorm backwards in reverse order.
//
// Absorbed inference (MlaKvCache + forward_absorbed): the cache holds only ckv [C] and the
// RoPE'd k_pe [R] per token. With W_UK[h] = kv_b.weight rows [h(N+V), h(N+V)+N) ([N, C])
// and W_UV[h] the next V rows ([V, C]):
//   q_lat[h]  = q_nope[h] W_UK[h]                                                 [C]
//   score[h,t] = scale * (q_lat[h] . ckv[t] + q_pe[h] . k_pe[t])
//   o_lat[h]  = sum_t softmax(score[h])[t] ckv[t]                                 [C]
//   O[h]      = o_lat[h] W_UV[h]^T,  y = o_proj(O)
// which equals the training path (q_nope . k_nope[t,h] = q_nope . W_UK[h] ckv[t]) without
// ever expanding per-head K or V. The cache is paged: fixed blocks of block_size tokens
// (64 by default, as FlashMLA) in one shared pool, with a block table per sequence.
// Decode attention is split-K over fixed chunks of blocks, each with its own softmax max
// and sum, combined in order (online softmax): parallel even for one sequence, and
// bit-identical for any thread count. In float, a step with at most 64 query rows (H*T)
// runs each chunk on r1/simd.hpp's lane products: the rows sit in register lanes and the
// cache blocks are read in place, never packed; bigger prefills (and double) use GEMMs.
// The absorption products (q_nope W_UK[h], o_lat W_UV[h]^T) run per head down the longer
// of the batch and token axes, so a batched decode step reads each W_UK[h] once.
// On CPUs, decode at V3's shape is compute-bound in float (about 15 FLOPs per cached
// byte at 16 heads), not bandwidth-bound as on a GPU.
//
// API: Mla(params) / MlaCache: forward(p, x, positions, cache), backward(p, cache, dy,
// grads). MlaKvCache(config, num_blocks, block_size): add_sequence, append, truncate,
// reset, length, bytes_per_token, bytes_in_use. forward_absorbed(p, x, seqs, kv, ws).
//
// Legend: B batch, S sequence length, D model dim (hidden_size), H heads, Q q_lora_rank,
// C kv_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, Dq = N + R,
// T new tokens per sequence in a decode step, L cached context length.
// DeepSeek-V3: D 7168, H 128, Q 1536, C 512, N 128, R 64, V 128.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "linear.hpp"
#include "norm.hpp"
#include "parallel.hpp"
#include "rope.hpp"
#include "simd.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

namespace r1 {

// ---------------------------------------------------------------------------------------
// Config: HF names (config.json); hidden_size is `dim`.
struct MlaConfig {
  int64_t dim = 0;                  // hidden_size
  int64_t num_attention_heads = 0;  // H
  int64_t q_lora_rank = 0;          // Q; 0 = a plain q_proj (V2-Lite)
  int64_t kv_lora_rank = 0;         // C
  int64_t qk_nope_head_dim = 0;     // N
  int64_t qk_rope_head_dim = 0;     // R
  int64_t v_head_dim = 0;           // V
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 4096;
  RopeConfig rope{};  // theta, style (rope_interleave), YaRN; its dim is set to qk_rope_head_dim

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }

  void validate() const {
    R1_CHECK(dim > 0 && num_attention_heads > 0, "[mla] hidden_size ", dim, " and num_attention_heads ", num_attention_heads,
             " must be positive");
    R1_CHECK(q_lora_rank >= 0, "[mla] q_lora_rank is ", q_lora_rank, ", expected >= 0 (0 = plain q_proj)");
    R1_CHECK(kv_lora_rank > 0 && qk_nope_head_dim > 0 && v_head_dim > 0, "[mla] kv_lora_rank ", kv_lora_rank,
             ", qk_nope_head_dim ", qk_nope_head_dim, " and v_head_dim ", v_head_dim, " must be positive");
    R1_CHECK(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0, "[mla] qk_rope_head_dim is ", qk_rope_head_dim,
             ", expected a positive even number");
    R1_CHECK(rms_norm_eps > 0.0, "[mla] rms_norm_eps is ", rms_norm_eps, ", expected > 0");
    R1_CHECK(max_position_embeddings > 0, "[mla] max_position_embeddings is ", max_position_embeddings, ", expected > 0");
  }

  RopeConfig rope_config() const {
    RopeConfig r = rope;
    r.dim = qk_rope_head_dim;
    return r;
  }
};

// ---------------------------------------------------------------------------------------
// Device kernels: MlaImpl<Cpu> below, MlaImpl<Cuda> in r1/cuda/mla.cuh.
R1_DECLARE_IMPL(MlaImpl, "mla.cuh");

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct Mla {
  MlaConfig config;
  Rope rope;
  Linear<T, Dev> q_a;      // q_a_proj [Q, D]          (q_lora_rank > 0)
  RMSNorm<T, Dev> q_norm;  // q_a_layernorm [Q]        (q_lora_rank > 0)
  Linear<T, Dev> q_b;      // q_b_proj [H*Dq, Q]       (q_lora_rank > 0)
  Linear<T, Dev> q;        // q_proj [H*Dq, D]         (q_lora_rank == 0)
  Linear<T, Dev> kv_a;     // kv_a_proj_with_mqa [C+R, D]
  RMSNorm<T, Dev> kv_norm; // kv_a_layernorm [C]
  Linear<T, Dev> kv_b;     // kv_b_proj [H*(N+V), C]
  Linear<T, Dev> o;        // o_proj [D, H*V]

  Mla() = default;
  explicit Mla(const MlaConfig& c) : config((c.validate(), c)), rope(c.rope_config()) {
    const int64_t h = c.num_attention_heads;
    if (c.q_lora_rank > 0) {
      q_a = Linear<T, Dev>(c.dim, c.q_lora_rank);
      q_norm = RMSNorm<T, Dev>(c.q_lora_rank, c.rms_norm_eps);
      q_b = Linear<T, Dev>(c.q_lora_rank, h * c.qk_head_dim());
    } else {
      q = Linear<T, Dev>(c.dim, h * c.qk_head_dim());
    }
    kv_a = Linear<T, Dev>(c.dim, c.kv_lora_rank + c.qk_rope_head_dim);
    kv_norm = RMSNorm<T, Dev>(c.kv_lora_rank, c.rms_norm_eps);
    kv_b = Linear<T, Dev>(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim));
    o = Linear<T, Dev>(h * c.v_head_dim, c.dim);
  }

  bool has_q_lora() const { return config.q_lora_rank > 0; }
  double softmax_scale() const { return rope.attention_scale(config.qk_head_dim()); }

  template <class F>
  void visit(F&& f) {
    if (has_q_lora()) {
      visit_prefixed("q_a_proj.", q_a, f);
      visit_prefixed("q_a_layernorm.", q_norm, f);
      visit_prefixed("q_b_proj.", q_b, f);
    } else {
      visit_prefixed("q_proj.", q, f);
    }
    visit_prefixed("kv_a_proj_with_mqa.", kv_a, f);
    visit_prefixed("kv_a_layernorm.", kv_norm, f);
    visit_prefixed("kv_b_proj.", kv_b, f);
    visit_prefixed("o_proj.", o, f);
  }
};

// ---------------------------------------------------------------------------------------
// Cache of the training path: the sub-layers' caches, the per-head Q, K, V and the
// probabilities, and the backward buffers. All are reused across calls.
template <class T, class Dev = Cpu>
struct MlaCache {
  LinearCache<T, Dev> q_a, q_b, q, kv_a, kv_b, o;
  RMSNormCache<T, Dev> q_norm, kv_norm;
  Tensor<int32_t, Dev> positions;  // [B*S]
  Tensor<T, Dev> q_rot;            // [B*S, H, Dq], q_pe RoPE'd
  Tensor<T, Dev> k_pe;             // [B*S, R], RoPE'd
  Tensor<T, Dev> qh, kh, vh;       // Cpu: [B, H, S, Dq], [B, H, S, Dq], [B, H, S, V]
  Tensor<T, Dev> probs;            // Cpu: [B, H, S, S]
  Tensor<float, Dev> lse;          // Cuda: [B, H, S], log-sum-exp of each score row (flash attention keeps no probs)
  Tensor<T, Dev> attn;             // [B, S, H*V]: o_proj's input
  // backward
  Tensor<T, Dev> dz;               // Cpu: [B, H, S, S]
  Tensor<T, Dev> dkh;              // Cpu: [B, H, S, Dq]; Cuda: [B, S, H, R], each head's part of dk_pe
  Tensor<float, Dev> delta;        // Cuda: [B, H, S], rowsum(dO * O)
  Tensor<T, Dev> dq;               // [B*S, H, Dq]
  Tensor<T, Dev> dkv;              // [B, S, H*(N+V)]
  Tensor<T, Dev> dk_pe;            // [B*S, R]
  Tensor<T, Dev> dkva;             // [B, S, C+R]
  Tensor<T, Dev> dx;               // [B, S, D]
  int64_t batch = 0, seq = 0;
};

// ---------------------------------------------------------------------------------------
// Paged latent KV cache for absorbed inference: per token kv_norm(c_kv) [C] then k_pe [R],
// stored together as one row of C+R (FlashMLA's 512+64 = 576 layout). The pool holds
// num_blocks blocks of block_size tokens; each sequence has a block table.
template <class T, class Dev = Cpu>
class MlaKvCache {
 public:
  MlaKvCache() = default;
  MlaKvCache(const MlaConfig& c, int64_t num_blocks, int64_t block_size = 64)
      : kv_lora_rank_(c.kv_lora_rank), rope_dim_(c.qk_rope_head_dim), block_size_(block_size),
        max_positions_(c.max_position_embeddings) {
    c.validate();
    R1_CHECK(num_blocks > 0 && block_size > 0, "[mla_kv_cache] num_blocks ", num_blocks, " and block_size ", block_size,
             " must be positive");
    pool_.resize(Shape{num_blocks, block_size, row()});
    free_.reserve(static_cast<std::size_t>(num_blocks));
    reset();
  }

  // A new, empty sequence; returns its id.
  int64_t add_sequence() {
    seqs_.push_back({});
    return static_cast<int64_t>(seqs_.size()) - 1;
  }

  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  int64_t length(int64_t seq) const { return at(seq, "mla_kv_cache.length").length; }
  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return pool_.size(0); }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t kv_lora_rank() const { return kv_lora_rank_; }
  int64_t rope_dim() const { return rope_dim_; }
  int64_t max_positions() const { return max_positions_; }
  int64_t row() const { return kv_lora_rank_ + rope_dim_; }
  // Bytes one cached token takes: (C + R) * sizeof(T) (V3 in bf16: 576 * 2 = 1152 per layer).
  int64_t bytes_per_token() const { return row() * static_cast<int64_t>(sizeof(T)); }
  int64_t tokens_in_use() const {
    int64_t n = 0;
    for (const auto& s : seqs_) n += s.length;
    return n;
  }
  // Bytes of the blocks held by sequences (whole blocks, so it includes the partly filled tails).
  int64_t bytes_in_use() const { return (num_blocks() - free_blocks()) * block_size_ * bytes_per_token(); }
  // Blocks needed to grow seq by n tokens.
  int64_t blocks_needed(int64_t seq, int64_t n) const {
    const Seq& s = at(seq, "mla_kv_cache.append");
    const int64_t have = static_cast<int64_t>(s.blocks.size());
    return std::max<int64_t>(0, (s.length + n + block_size_ - 1) / block_size_ - have);
  }
  // Throws (before touching anything) unless seq can grow by n tokens.
  void check_append(int64_t seq, int64_t n, int64_t needed_elsewhere = 0) const {
    const Seq& s = at(seq, "mla_kv_cache.append");
    R1_CHECK(n >= 0, "[mla_kv_cache.append] n is ", n, ", expected >= 0");
    R1_CHECK(s.length + n <= max_positions_, "[mla_kv_cache.append] sequence ", seq, " would reach position ",
             s.length + n - 1, ", past max_position_embeddings ", max_positions_);
    const int64_t needed = blocks_needed(seq, n) + needed_elsewhere;
    R1_CHECK(needed <= free_blocks(), "[mla_kv_cache.append] the pool is full: sequence ", seq, " needs ", needed,
             " more blocks of ", block_size_, " tokens, ", free_blocks(), " of ", num_blocks(), " are free");
  }

  // Appends n tokens: latent [n, C] (kv_norm(c_kv)) and k_pe [n, R] (after RoPE).
  void append(int64_t seq, ConstView<T, Dev> latent, ConstView<T, Dev> k_pe) {
    R1_CHECK(latent.rank() == 2 && latent.size(1) == kv_lora_rank_, "[mla_kv_cache.append] latent has shape ", latent.shape(),
             ", expected [n, ", kv_lora_rank_, "]");
    check_shape(k_pe, Shape{latent.size(0), rope_dim_}, "mla_kv_cache.append", "k_pe");
    const int64_t n = latent.size(0);
    check_append(seq, n);
    Seq& s = seqs_[static_cast<std::size_t>(seq)];
    for (int64_t need = blocks_needed(seq, n); need > 0; --need) {
      s.blocks.push_back(free_.back());
      free_.pop_back();
    }
    // Tokens that share a block are consecutive rows of the pool: one strided copy per block.
    for (int64_t i = 0; i < n;) {
      const int64_t t = s.length + i, run = std::min(n - i, block_size_ - t % block_size_);
      T* dst = token(s, t);
      const typename View<T, Dev>::Strides rows{row(), 1};
      MlaImpl<Dev>::copy_rows(latent.slice(0, i, i + run), View<T, Dev>(dst, Shape{run, kv_lora_rank_}, rows));
      MlaImpl<Dev>::copy_rows(k_pe.slice(0, i, i + run), View<T, Dev>(dst + kv_lora_rank_, Shape{run, rope_dim_}, rows));
      i += run;
    }
    s.length += n;
  }

  // Rolls seq back to its first `length` tokens (speculative decoding); frees whole blocks.
  void truncate(int64_t seq, int64_t length) {
    Seq& s = at(seq, "mla_kv_cache.truncate");
    R1_CHECK(0 <= length && length <= s.length, "[mla_kv_cache.truncate] length ", length, " is outside [0, ", s.length,
             "] for sequence ", seq);
    const std::size_t keep = static_cast<std::size_t>((length + block_size_ - 1) / block_size_);
    while (s.blocks.size() > keep) {
      free_.push_back(s.blocks.back());
      s.blocks.pop_back();
    }
    s.length = length;
  }

  // Empties one sequence (it keeps its id), or the whole cache (no sequences left).
  void reset(int64_t seq) { truncate(seq, 0); }
  void reset() {
    seqs_.clear();
    free_.clear();
    for (int64_t b = num_blocks() - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));  // block 0 is used first
  }

  // Block i of seq as a [tokens, C+R] view (the last block may be partly filled).
  View<const T, Dev> block(int64_t seq, int64_t i) const {
    const Seq& s = at(seq, "mla_kv_cache.block");
    const int64_t n = std::min(block_size_, s.length - i * block_size_);
    R1_CHECK(0 <= i && n > 0, "[mla_kv_cache.block] block ", i, " of sequence ", seq, " (length ", s.length, ") holds no tokens");
    return View<const T, Dev>(pool_.data() + s.blocks[static_cast<std::size_t>(i)] * block_size_ * row(), Shape{n, row()});
  }
  int64_t num_blocks_of(int64_t seq) const {
    const Seq& s = at(seq, "mla_kv_cache.block");
    return (s.length + block_size_ - 1) / block_size_;
  }
  const std::vector<int32_t>& block_table(int64_t seq) const { return at(seq, "mla_kv_cache.block_table").blocks; }
  // The whole pool [num_blocks, block_size, C+R], for kernels that walk the block tables.
  View<const T, Dev> pool() const { return pool_.view(); }

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t length = 0;
  };
  const Seq& at(int64_t seq, const char* op) const {
    R1_CHECK(0 <= seq && seq < num_sequences(), "[", op, "] sequence ", seq, " does not exist (", num_sequences(),
             " sequences)");
    return seqs_[static_cast<std::size_t>(seq)];
  }
  Seq& at(int64_t seq, const char* op) { return const_cast<Seq&>(static_cast<const MlaKvCache&>(*this).at(seq, op)); }
  T* token(const Seq& s, int64_t t) {
    return pool_.data() + (s.blocks[static_cast<std::size_t>(t / block_size_)] * block_size_ + t % block_size_) * row();
  }

  int64_t kv_lora_rank_ = 0, rope_dim_ = 0, block_size_ = 64, max_positions_ = 0;
  Tensor<T, Dev> pool_;         // [num_blocks, block_size, C+R]
  std::vector<int32_t> free_;   // free block ids; the back is handed out next
  std::vector<Seq> seqs_;
};

// Buffers of absorbed inference, reused across steps.
// Attention runs split-K (flash-decoding): each sequence's blocks are cut into chunks of
// kChunkBlocks blocks, a fixed count, so the work splits across threads the same way for
// any thread count. Each chunk keeps its own max, sum and latent accumulator (a softmax
// over the chunk), and the chunks of a sequence are combined in order (online softmax).
template <class T, class Dev = Cpu>
struct MlaDecodeCache {
  static constexpr int64_t kChunkBlocks = 4;
  Tensor<T, Dev> qa, q, kva, kpe, qcat, attn, y;
  Tensor<T, Dev> scores;           // Cpu: [chunks, H*T, kChunkBlocks * block_size]; float decode: [chunks, panels,
                                   //   kChunkBlocks * block_size + C, 16], scores then output, transposed
  Tensor<T, Dev> qpanels;          // Cpu, float decode: [B, panels, C+R, 16], qcat rows in register lanes
  Tensor<T, Dev> acc;              // Cpu: [chunks, H*T, C]; Cuda: [B, splits, H*T, C], each split's normalized output
  Tensor<T, Dev> run_max, run_sum; // Cpu: [chunks, H*T]
  Tensor<float, Dev> split_lse;    // Cuda: [B, splits, H*T], each split's log-sum-exp
  Tensor<int32_t, Dev> block_tables, lengths;  // Cuda: [B, max blocks] and [B], the cache's tables on the device
  Tensor<T, Dev> olat;             // [B, H*T, C]
  RMSNormCache<T, Dev> q_norm, kv_norm;
  Tensor<int32_t, Dev> positions;
  std::vector<int64_t> chunk_seq, chunk_first;  // batch index and first chunk of each sequence
};

// ---------------------------------------------------------------------------------------
template <>
struct MlaImpl<Cpu> {
  // Query rows per causal tile of the training path; tiles above the diagonal are skipped.
  static constexpr int64_t kCausalTile = 64;

  template <class T>
  static MatrixMap<T> mat(T* p, int64_t rows, int64_t cols, int64_t stride) {
    return MatrixMap<T>(p, rows, cols, Eigen::OuterStride<>(std::max<int64_t>(stride, 1)));
  }

  // Softmax of row[0, valid) after scaling; row[valid, end) = 0.
  template <class Row, class T>
  static void softmax_prefix(Row&& row, int64_t valid, T scale) {
    auto head = row.head(valid);
    head *= scale;
    const T m = head.maxCoeff();
    head = (head.array() - m).exp().matrix();
    head /= head.sum();
    row.tail(row.size() - valid).setZero();
  }

  // dst = src for two [rows, cols] views with unit column stride (rows may be strided).
  template <class T>
  static void copy_rows(ConstView<T, Cpu> src, View<T, Cpu> dst) {
    dst.matrix() = src.matrix();
  }

  // dst += src, same shapes.
  template <class T>
  static void add(ConstView<T, Cpu> src, View<T, Cpu> dst) {
    dst.matrix() += src.matrix();
  }

  // Q, K, V per head, then P and O for every (b, h).
  template <class T>
  static void attention_forward(const Mla<T, Cpu>& p, MlaCache<T, Cpu>& c) {
    const auto& cf = p.config;
    const int64_t B = c.batch, S = c.seq, H = cf.num_attention_heads, N = cf.qk_nope_head_dim, R = cf.qk_rope_head_dim,
                  V = cf.v_head_dim, Dq = N + R, Dkv = N + V;
    c.qh.resize(Shape{B, H, S, Dq});
    c.kh.resize(Shape{B, H, S, Dq});
    c.vh.resize(Shape{B, H, S, V});
    c.probs.resize(Shape{B, H, S, S});
    const T* q = c.q_rot.data();
    const T* kv = c.kv_b.y.data();
    const T* kpe = c.k_pe.data();
    const T scale = static_cast<T>(p.softmax_scale());
    parallel_for(B * H, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        auto qh = mat(c.qh.data() + bh * S * Dq, S, Dq, Dq);
        auto kh = mat(c.kh.data() + bh * S * Dq, S, Dq, Dq);
        auto vh = mat(c.vh.data() + bh * S * V, S, V, V);
        const auto qs = mat(q + b * S * H * Dq + h * Dq, S, Dq, H * Dq);
        const auto ks = mat(kv + b * S * H * Dkv + h * Dkv, S, N, H * Dkv);
        const auto vs = mat(kv + b * S * H * Dkv + h * Dkv + N, S, V, H * Dkv);
        const auto ps = mat(kpe + b * S * R, S, R, R);
        qh = qs;
        kh.leftCols(N) = ks;
        kh.rightCols(R) = ps;
        vh = vs;
        // Causal tiles of query rows [r0, r0 + n) see keys [0, r0 + n): the products skip
        // the tiles above the diagonal (P there is never written nor read).
        auto pr = mat(c.probs.data() + bh * S * S, S, S, S);
        auto out = mat(c.attn.data() + b * S * H * V + h * V, S, V, H * V);
        for (int64_t r0 = 0; r0 < S; r0 += kCausalTile) {
          const int64_t n = std::min(kCausalTile, S - r0), w = r0 + n;
          gemm(qh.middleRows(r0, n), kh.topRows(w).transpose(), pr.block(r0, 0, n, w));
          for (int64_t s = r0; s < w; ++s) softmax_prefix(pr.row(s).head(w), s + 1, scale);
          gemm(pr.block(r0, 0, n, w), vh.topRows(w), out.middleRows(r0, n));
        }
      }
    }, min_items_per_thread(S * S * (Dq + V)));
  }

  // From dO (o_proj's dx) to dq [B*S,H,Dq] (w.r.t. the RoPE'd q), dkv [B,S,H*(N+V)] and
  // dk_pe [B*S,R] (w.r.t. the RoPE'd k_pe).
  template <class T>
  static void attention_backward(const Mla<T, Cpu>& p, MlaCache<T, Cpu>& c) {
    const auto& cf = p.config;
    const int64_t B = c.batch, S = c.seq, H = cf.num_attention_heads, N = cf.qk_nope_head_dim, R = cf.qk_rope_head_dim,
                  V = cf.v_head_dim, Dq = N + R, Dkv = N + V;
    const T* dout = c.o.dx.data();
    const T scale = static_cast<T>(p.softmax_scale());
    c.dz.resize(Shape{B, H, S, S});
    c.dkh.resize(Shape{B, H, S, Dq});
    parallel_for(B * H, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const auto qh = mat<const T>(c.qh.data() + bh * S * Dq, S, Dq, Dq);
        const auto kh = mat<const T>(c.kh.data() + bh * S * Dq, S, Dq, Dq);
        const auto vh = mat<const T>(c.vh.data() + bh * S * V, S, V, V);
        const auto pr = mat<const T>(c.probs.data() + bh * S * S, S, S, S);
        const auto dO = mat(dout + b * S * H * V + h * V, S, V, H * V);
        auto dz = mat(c.dz.data() + bh * S * S, S, S, S);
        auto dv = mat(c.dkv.data() + b * S * H * Dkv + h * Dkv + N, S, V, H * Dkv);
        auto dq = mat(c.dq.data() + b * S * H * Dq + h * Dq, S, Dq, H * Dq);
        auto dkh = mat(c.dkh.data() + bh * S * Dq, S, Dq, Dq);
        dv.setZero();
        dkh.setZero();
        // The forward's causal tiles; dV and dK accumulate over them in tile order.
        for (int64_t r0 = 0; r0 < S; r0 += kCausalTile) {
          const int64_t n = std::min(kCausalTile, S - r0), w = r0 + n;
          const auto p_t = pr.block(r0, 0, n, w);
          auto dz_t = dz.block(r0, 0, n, w);
          gemm(dO.middleRows(r0, n), vh.topRows(w).transpose(), dz_t);                   // dP
          gemm(p_t.transpose(), dO.middleRows(r0, n), dv.topRows(w), /*accumulate=*/true);  // dV
          for (int64_t s = 0; s < n; ++s) {
            const T r = p_t.row(s).dot(dz_t.row(s));
            dz_t.row(s) = (scale * p_t.row(s).array() * (dz_t.row(s).array() - r)).matrix();
          }
          gemm(dz_t, kh.topRows(w), dq.middleRows(r0, n));                                 // dQ
          gemm(dz_t.transpose(), qh.middleRows(r0, n), dkh.topRows(w), /*accumulate=*/true);  // dK
        }
        mat(c.dkv.data() + b * S * H * Dkv + h * Dkv, S, N, H * Dkv) = dkh.leftCols(N);
      }
    }, min_items_per_thread(S * S * (2 * Dq + 2 * V)));
    // dk_pe = sum over heads, in head order.
    parallel_for(B * S, [&](int64_t begin, int64_t end) {
      for (int64_t bs = begin; bs < end; ++bs) {
        const int64_t b = bs / S, s = bs % S;
        auto row = c.dk_pe.matrix().row(bs);
        row.setZero();
        for (int64_t h = 0; h < H; ++h) row += mat<const T>(c.dkh.data() + ((b * H + h) * S + s) * Dq + N, 1, R, R);
      }
    }, min_items_per_thread(H * R));
  }

  // Decode steps (at most kMaxLaneRows query rows, H*T) run on r1/simd.hpp's lane products:
  // the rows sit in the 16 lanes of a register and every cached element is read once per
  // panel of 16 rows, straight from the pool, with no packing. Larger prefills use GEMMs.
  static constexpr int64_t kMaxLaneRows = 4 * simd::kLanes;

  // Split-K attention over every chunk with GEMMs: scores, one softmax pass, P x latent.
  template <class T>
  static void chunks_by_gemm(const Mla<T, Cpu>& p, const MlaKvCache<T, Cpu>& kv, const std::vector<int64_t>& seqs,
                             int64_t Tn, MlaDecodeCache<T, Cpu>& w) {
    const auto& cf = p.config;
    const int64_t H = cf.num_attention_heads, R = cf.qk_rope_head_dim, C = cf.kv_lora_rank, row = C + R, rows = H * Tn,
                  bs = kv.block_size(), K = MlaDecodeCache<T, Cpu>::kChunkBlocks, total = w.chunk_first.back();
    const T scale = static_cast<T>(p.softmax_scale());
    w.scores.resize(Shape{total, rows, K * bs});
    const T lowest = -std::numeric_limits<T>::infinity();
    parallel_for(total, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        const int64_t b = w.chunk_seq[static_cast<std::size_t>(ci)], seq = seqs[static_cast<std::size_t>(b)];
        const int64_t L0 = kv.length(seq) - Tn, first = (ci - w.chunk_first[static_cast<std::size_t>(b)]) * K;
        const int64_t last = std::min(first + K, kv.num_blocks_of(seq));
        const auto qcat = mat<const T>(w.qcat.data() + b * rows * row, rows, row, row);
        auto acc = mat(w.acc.data() + ci * rows * C, rows, C, C);
        auto sc = mat(w.scores.data() + ci * rows * K * bs, rows, K * bs, K * bs);
        T* m = w.run_max.data() + ci * rows;
        T* l = w.run_sum.data() + ci * rows;
        // Scores of the chunk's blocks side by side, then one softmax pass per row (the
        // chunk's blocks, about K * 150 KB at V3's shape, stay in L2 for the second product).
        const int64_t t0 = first * bs;
        int64_t width = 0;
        for (int64_t i = first; i < last; ++i) {
          const auto blk = kv.block(seq, i).matrix();
          gemm(qcat, blk.transpose(), sc.middleCols(width, blk.rows()));
          width += blk.rows();
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t valid = std::clamp<int64_t>(L0 + r % Tn + 1 - t0, 0, width);  // row (h, j) sees t < L0 + j + 1
          auto s_row = sc.row(r);
          s_row.segment(valid, width - valid).setZero();
          if (valid == 0) {
            m[r] = lowest;
            l[r] = 0;
            continue;
          }
          auto head = s_row.head(valid);
          head *= scale;
          m[r] = head.maxCoeff();
          head = (head.array() - m[r]).exp().matrix();
          l[r] = head.sum();
        }
        for (int64_t i = first, off = 0; i < last; ++i) {
          const auto blk = kv.block(seq, i).matrix();
          gemm(sc.middleCols(off, blk.rows()), blk.leftCols(C), acc, /*accumulate=*/i > first);
          off += blk.rows();
        }
      }
    }, min_items_per_thread(2 * rows * K * bs * (C + row)));
  }

  // The same split-K attention with the query rows in register lanes, in panels of 16:
  // St = blocks x panel^T, a softmax down each lane, then Ot = blocks^T x St over the
  // chunk; Ot is transposed into acc, so the combine step reads the same layout.
  static void chunks_in_lanes(const Mla<float, Cpu>& p, const MlaKvCache<float, Cpu>& kv,
                              const std::vector<int64_t>& seqs, int64_t Tn, MlaDecodeCache<float, Cpu>& w) {
    using Lanes = Eigen::Array<float, Eigen::Dynamic, simd::kLanes, Eigen::RowMajor>;
    using LaneRow = Eigen::Array<float, 1, simd::kLanes>;
    const auto& cf = p.config;
    const int64_t B = static_cast<int64_t>(seqs.size()), H = cf.num_attention_heads, R = cf.qk_rope_head_dim,
                  C = cf.kv_lora_rank, row = C + R, rows = H * Tn, bs = kv.block_size(),
                  K = MlaDecodeCache<float, Cpu>::kChunkBlocks, total = w.chunk_first.back(), L = simd::kLanes,
                  panels = (rows + L - 1) / L, span = K * bs + C;
    const float scale = static_cast<float>(p.softmax_scale()), lowest = -std::numeric_limits<float>::infinity();
    w.qpanels.resize(Shape{B, panels, row, L});
    for (int64_t b = 0; b < B; ++b)
      for (int64_t pi = 0; pi < panels; ++pi)
        simd::pack_lanes(w.qcat.data() + (b * rows + pi * L) * row, std::min(L, rows - pi * L), row, row,
                         w.qpanels.data() + (b * panels + pi) * row * L);
    w.scores.resize(Shape{total, panels, span, L});
    parallel_for(total, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        const int64_t b = w.chunk_seq[static_cast<std::size_t>(ci)], seq = seqs[static_cast<std::size_t>(b)];
        const int64_t L0 = kv.length(seq) - Tn, first = (ci - w.chunk_first[static_cast<std::size_t>(b)]) * K;
        const int64_t last = std::min(first + K, kv.num_blocks_of(seq)), t0 = first * bs;
        for (int64_t pi = 0; pi < panels; ++pi) {
          float* st = w.scores.data() + (ci * panels + pi) * span * L;
          float* ot = st + K * bs * L;
          int64_t width = 0;
          for (int64_t i = first; i < last; ++i) {
            const auto blk = kv.block(seq, i);
            simd::lanes_abt(w.qpanels.data() + (b * panels + pi) * row * L, blk.data(), blk.size(0), row, row,
                            st + width * L, i + 1 < last ? kv.block(seq, i + 1).data() : nullptr);
            width += blk.size(0);
          }
          // Lane l is query row pi*16 + l = (h, j), which sees tokens t < L0 + j + 1.
          Eigen::Map<Lanes> s(st, width, L);
          std::array<bool, simd::kLanes> sees_any{};
          for (int64_t l = 0; l < L; ++l) {
            const int64_t r = pi * L + l;
            const int64_t valid = r < rows ? std::clamp<int64_t>(L0 + r % Tn + 1 - t0, 0, width) : 0;
            s.col(l).segment(valid, width - valid).setConstant(lowest);
            sees_any[static_cast<std::size_t>(l)] = valid > 0;
          }
          // Each lane's max down the rows, 16 lanes per vector op (masked scores are -inf).
          LaneRow max_score = s.row(0);
          for (int64_t t = 1; t < width; ++t) max_score = max_score.max(s.row(t));
          for (int64_t l = 0; l < L; ++l) max_score(l) = sees_any[static_cast<std::size_t>(l)] ? max_score(l) * scale : 0.0f;
          s = (s * scale).rowwise() - max_score;
          s = s.exp();  // masked tokens: exp(-inf) = 0
          const LaneRow sums = s.colwise().sum();
          for (int64_t i = first, off = 0; i < last; ++i) {
            const auto blk = kv.block(seq, i);
            simd::lanes_atb(st + off * L, blk.data(), blk.size(0), C, row, ot, /*accumulate=*/i > first);
            off += blk.size(0);
          }
          const int64_t lanes_used = std::min(L, rows - pi * L);
          for (int64_t l = 0; l < lanes_used; ++l) {
            const int64_t r = pi * L + l;
            w.run_max.data()[ci * rows + r] = sums(l) > 0.0f ? max_score(l) : lowest;
            w.run_sum.data()[ci * rows + r] = sums(l);
          }
          simd::transpose(ot, L, C, lanes_used, w.acc.data() + (ci * rows + pi * L) * C, C);
        }
      }
    }, min_items_per_thread(2 * rows * K * bs * (C + row)));
  }

  // Absorbed attention of forward_absorbed, for the B sequences seqs after their T new
  // tokens were appended: q (RoPE'd) -> attn [B, T, H*V].
  template <class T>
  static void absorbed_attention(const Mla<T, Cpu>& p, const MlaKvCache<T, Cpu>& kv, const std::vector<int64_t>& seqs,
                                 int64_t Tn, MlaDecodeCache<T, Cpu>& w) {
    const auto& cf = p.config;
    const int64_t B = static_cast<int64_t>(seqs.size()), H = cf.num_attention_heads, N = cf.qk_nope_head_dim,
                  R = cf.qk_rope_head_dim, V = cf.v_head_dim, C = cf.kv_lora_rank, Dq = N + R, Dkv = N + V, row = C + R,
                  rows = H * Tn, K = MlaDecodeCache<T, Cpu>::kChunkBlocks;
    const T lowest = -std::numeric_limits<T>::infinity();
    const T* wkv = p.kv_b.weight.data();
    // Per head, the query rows form a grid of B sequences x T new tokens. The absorption
    // products run down the longer axis as one matrix with a uniform row stride (B rows for
    // batched decode, T rows for a prefill), so W_UK[h] and W_UV[h] are read once per
    // (head, index on the shorter axis) rather than once per row.
    const bool down_batch = B >= Tn;
    const int64_t across = down_batch ? Tn : B, along = down_batch ? B : Tn;
    const int64_t q_step = down_batch ? Tn * H * Dq : H * Dq, lat_step = down_batch ? rows : 1,
                  attn_step = down_batch ? Tn * H * V : H * V;
    struct FirstRow {
      int64_t b, j;
    };
    const auto first_row = [&](int64_t i) { return down_batch ? FirstRow{0, i} : FirstRow{i, 0}; };
    // qcat[b, h*T + j] = [q_nope[b,j,h] W_UK[h] | q_pe[b,j,h]]
    w.qcat.resize(Shape{B, rows, row});
    parallel_for(H * across, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t h = item / across;
        const auto [b, j] = first_row(item % across);
        const T* q = w.q.data() + ((b * Tn + j) * H + h) * Dq;
        auto qcat = mat(w.qcat.data() + (b * rows + h * Tn + j) * row, along, row, lat_step * row);
        gemm(mat(q, along, N, q_step), mat(wkv + h * Dkv * C, N, C, C), qcat.leftCols(C));
        qcat.rightCols(R) = mat(q + N, along, R, q_step);
      }
    }, min_items_per_thread(along * N * C));
    // Chunks: sequence b owns chunks [chunk_first[b], chunk_first[b+1]).
    w.chunk_seq.clear();
    w.chunk_first.assign(1, 0);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t chunks = (kv.num_blocks_of(seqs[b]) + K - 1) / K;
      for (int64_t c = 0; c < chunks; ++c) w.chunk_seq.push_back(b);
      w.chunk_first.push_back(w.chunk_first.back() + chunks);
    }
    const int64_t total = w.chunk_first.back();
    w.acc.resize(Shape{total, rows, C});
    w.run_max.resize(Shape{total, rows});
    w.run_sum.resize(Shape{total, rows});
    if constexpr (std::is_same_v<T, float>) {
      if (rows <= kMaxLaneRows) {
        chunks_in_lanes(p, kv, seqs, Tn, w);
      } else {
        chunks_by_gemm(p, kv, seqs, Tn, w);
      }
    } else {
      chunks_by_gemm(p, kv, seqs, Tn, w);
    }
    // Combine each sequence's chunks in order, then O[b, j, h] = o_lat W_UV[h]^T.
    w.olat.resize(Shape{B, rows, C});
    parallel_for(B * rows, [&](int64_t begin, int64_t end) {
      for (int64_t br = begin; br < end; ++br) {
        const int64_t b = br / rows, r = br % rows;
        const int64_t c0 = w.chunk_first[static_cast<std::size_t>(b)], c1 = w.chunk_first[static_cast<std::size_t>(b) + 1];
        T m = lowest, l = 0;
        for (int64_t ci = c0; ci < c1; ++ci) m = std::max(m, w.run_max.data()[ci * rows + r]);
        auto o = w.olat.matrix().row(br);
        o.setZero();
        for (int64_t ci = c0; ci < c1; ++ci) {
          const T mc = w.run_max.data()[ci * rows + r];
          if (mc == lowest) continue;  // no visible token in this chunk
          const T f = std::exp(mc - m);
          l += f * w.run_sum.data()[ci * rows + r];
          o += f * mat<const T>(w.acc.data() + (ci * rows + r) * C, 1, C, C);
        }
        o /= l;
      }
    }, min_items_per_thread(C * (w.chunk_first.back() / std::max<int64_t>(B, 1) + 1)));
    parallel_for(H * across, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t h = item / across;
        const auto [b, j] = first_row(item % across);
        gemm(mat<const T>(w.olat.data() + (b * rows + h * Tn + j) * C, along, C, lat_step * C),
             mat(wkv + (h * Dkv + N) * C, V, C, C).transpose(),
             mat(w.attn.data() + (b * Tn + j) * H * V + h * V, along, V, attn_step));
      }
    }, min_items_per_thread(along * C * V));
  }
};

namespace detail {
template <class T, class Dev>
void check_mla_weights(const Mla<T, Dev>& p, const char* op) {
  const auto& c = p.config;
  R1_CHECK(!p.rope.inv_freq.empty(), "[", op, "] the Mla was default-constructed: build it from an MlaConfig");
  const int64_t H = c.num_attention_heads;
  const auto expect = [&](const Tensor<T, Dev>& t, Shape s, const char* name) {
    R1_CHECK(t.shape() == s, "[", op, "] ", name, " has shape ", t.shape(), ", expected ", s);
  };
  if (p.has_q_lora()) {
    expect(p.q_a.weight, Shape{c.q_lora_rank, c.dim}, "q_a_proj.weight");
    expect(p.q_norm.weight, Shape{c.q_lora_rank}, "q_a_layernorm.weight");
    expect(p.q_b.weight, Shape{H * c.qk_head_dim(), c.q_lora_rank}, "q_b_proj.weight");
  } else {
    expect(p.q.weight, Shape{H * c.qk_head_dim(), c.dim}, "q_proj.weight");
  }
  expect(p.kv_a.weight, Shape{c.kv_lora_rank + c.qk_rope_head_dim, c.dim}, "kv_a_proj_with_mqa.weight");
  expect(p.kv_norm.weight, Shape{c.kv_lora_rank}, "kv_a_layernorm.weight");
  expect(p.kv_b.weight, Shape{H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, "kv_b_proj.weight");
  expect(p.o.weight, Shape{c.dim, H * c.v_head_dim}, "o_proj.weight");
}
}  // namespace detail

// x [B, S, D] -> y [B, S, D], causal. positions: [S] (shared by the batch) or [B, S].
template <class T, class Dev>
const Tensor<T, Dev>& forward(const Mla<T, Dev>& p, ConstView<T, Dev> x, ConstView<int32_t, Dev> positions,
                              MlaCache<T, Dev>& c) {
  detail::check_mla_weights(p, "mla.forward");
  const auto& cf = p.config;
  R1_CHECK(x.rank() == 3 && x.size(2) == cf.dim, "[mla.forward] x has shape ", x.shape(), ", expected [B, S, ", cf.dim, "]");
  const int64_t B = x.size(0), S = x.size(1), H = cf.num_attention_heads, N = cf.qk_nope_head_dim,
                R = cf.qk_rope_head_dim, V = cf.v_head_dim, C = cf.kv_lora_rank, Dq = N + R;
  R1_CHECK(((positions.rank() == 1 && positions.size(0) == S) || positions.shape() == Shape{B, S}),
           "[mla.forward] positions have shape ", positions.shape(), ", expected [", S, "] or [", B, ", ", S, "]");
  R1_CHECK(positions.is_contiguous(), "[mla.forward] positions are not contiguous");
  c.batch = B;
  c.seq = S;
  // Checked on the host (positions may live on the device), then broadcast to [B*S].
  Tensor<int32_t> given(positions.shape()), all(Shape{B * S});
  copy(positions, given.view());
  for (int64_t i = 0; i < B * S; ++i) {
    const int32_t pos = given.data()[positions.rank() == 1 ? i % S : i];
    R1_CHECK(0 <= pos && pos < cf.max_position_embeddings, "[mla.forward] position ", pos, " at index ", i,
             " is outside [0, max_position_embeddings ", cf.max_position_embeddings, ")");
    all.data()[i] = pos;
  }
  c.positions.resize(Shape{B * S});
  copy(all.view(), c.positions.view());
  // Queries
  const Tensor<T, Dev>* qy;
  if (p.has_q_lora()) {
    forward(p.q_a, x, c.q_a);
    forward(p.q_norm, c.q_a.y, c.q_norm);
    qy = &forward(p.q_b, c.q_norm.y, c.q_b);
  } else {
    qy = &forward(p.q, x, c.q);
  }
  c.q_rot.resize(Shape{B * S, H, Dq});
  copy(View<const T, Dev>(qy->data(), c.q_rot.shape()), c.q_rot.view());
  auto q_pe = c.q_rot.view().slice(2, N, Dq);
  forward(p.rope, q_pe, c.positions, q_pe);
  // Keys and values: the latent, its norm, and the shared RoPE head.
  const auto& kva = forward(p.kv_a, x, c.kv_a);
  const View<const T, Dev> kva2(kva.data(), Shape{B * S, C + R});
  c.k_pe.resize(Shape{B * S, R});
  forward(p.rope, kva2.slice(1, C, C + R), c.positions, c.k_pe.view());
  forward(p.kv_b, forward(p.kv_norm, kva.view().slice(2, 0, C), c.kv_norm), c.kv_b);
  c.attn.resize(Shape{B, S, H * V});
  MlaImpl<Dev>::attention_forward(p, c);
  return forward(p.o, c.attn, c.o);
}

// dy [B, S, D] -> dx [B, S, D]; adds every parameter gradient into grads.
template <class T, class Dev>
const Tensor<T, Dev>& backward(const Mla<T, Dev>& p, MlaCache<T, Dev>& c, ConstView<T, Dev> dy, Mla<T, Dev>& grads) {
  R1_CHECK(c.attn.data() != nullptr, "[mla.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dy.shape() == c.o.y.shape(), "[mla.backward] dy has shape ", dy.shape(), ", expected ", c.o.y.shape(),
           " (the forward output)");
  R1_CHECK(grads.has_q_lora() == p.has_q_lora(), "[mla.backward] grads and params differ in q_lora_rank (",
           grads.config.q_lora_rank, " vs ", p.config.q_lora_rank, "): use r1::zeros_like(params)");
  const auto& cf = p.config;
  const int64_t B = c.batch, S = c.seq, H = cf.num_attention_heads, N = cf.qk_nope_head_dim, R = cf.qk_rope_head_dim,
                V = cf.v_head_dim, C = cf.kv_lora_rank, Dq = N + R;
  backward(p.o, c.o, dy, grads.o);
  c.dq.resize(Shape{B * S, H, Dq});
  c.dkv.resize(Shape{B, S, H * (N + V)});
  c.dk_pe.resize(Shape{B * S, R});
  MlaImpl<Dev>::attention_backward(p, c);
  // Keys and values
  c.dkva.resize(Shape{B, S, C + R});
  const View<T, Dev> dkva2(c.dkva.data(), Shape{B * S, C + R});
  backward(p.rope, c.positions, c.dk_pe, dkva2.slice(1, C, C + R));
  const auto& dckv = backward(p.kv_norm, c.kv_norm, backward(p.kv_b, c.kv_b, c.dkv, grads.kv_b), grads.kv_norm);
  MlaImpl<Dev>::copy_rows(View<const T, Dev>(dckv.data(), Shape{B * S, C}), dkva2.slice(1, 0, C));
  c.dx = backward(p.kv_a, c.kv_a, c.dkva, grads.kv_a);
  // Queries
  auto dq_pe = c.dq.view().slice(2, N, Dq);
  backward(p.rope, c.positions, dq_pe, dq_pe);
  const View<const T, Dev> dq(c.dq.data(), Shape{B, S, H * Dq});
  if (p.has_q_lora()) {
    const auto& dqa = backward(p.q_norm, c.q_norm, backward(p.q_b, c.q_b, dq, grads.q_b), grads.q_norm);
    MlaImpl<Dev>::add(backward(p.q_a, c.q_a, dqa, grads.q_a).view(), c.dx.view());
  } else {
    MlaImpl<Dev>::add(backward(p.q, c.q, dq, grads.q).view(), c.dx.view());
  }
  return c.dx;
}

// Absorbed inference: x [B, T, D] holds T new tokens for each of the B sequences seqs[b]
// of kv, at positions length(seqs[b]) .. + T-1. Appends their latents to kv, attends over
// each whole sequence (causally among the new tokens) and returns y [B, T, D]. Sequences
// may have different lengths. A full pool or a position past max_position_embeddings
// throws before anything is written.
template <class T, class Dev>
const Tensor<T, Dev>& forward_absorbed(const Mla<T, Dev>& p, ConstView<T, Dev> x, const std::vector<int64_t>& seqs,
                                       MlaKvCache<T, Dev>& kv, MlaDecodeCache<T, Dev>& w) {
  detail::check_mla_weights(p, "mla.forward_absorbed");
  const auto& cf = p.config;
  R1_CHECK(x.rank() == 3 && x.size(2) == cf.dim, "[mla.forward_absorbed] x has shape ", x.shape(), ", expected [B, T, ", cf.dim,
           "]");
  const int64_t B = x.size(0), Tn = x.size(1), H = cf.num_attention_heads, N = cf.qk_nope_head_dim,
                R = cf.qk_rope_head_dim, V = cf.v_head_dim, C = cf.kv_lora_rank, Dq = N + R;
  R1_CHECK(static_cast<int64_t>(seqs.size()) == B, "[mla.forward_absorbed] ", seqs.size(), " sequence ids for a batch of ", B);
  R1_CHECK(kv.kv_lora_rank() == C && kv.rope_dim() == R, "[mla.forward_absorbed] the cache holds rows of ", kv.kv_lora_rank(),
           " + ", kv.rope_dim(), ", expected ", C, " + ", R);
  // Every check before the first write: ids distinct, positions in range, enough blocks.
  int64_t needed = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t a = 0; a < b; ++a)
      R1_CHECK(seqs[a] != seqs[b], "[mla.forward_absorbed] sequence ", seqs[b], " appears twice in the batch");
    kv.check_append(seqs[b], Tn, needed);
    needed += kv.blocks_needed(seqs[b], Tn);
  }
  Tensor<int32_t> positions(Shape{B * Tn});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Tn; ++j) positions.data()[b * Tn + j] = static_cast<int32_t>(kv.length(seqs[b]) + j);
  w.positions.resize(Shape{B * Tn});
  copy(positions.view(), w.positions.view());
  // Queries, with q_pe RoPE'd.
  w.q.resize(Shape{B * Tn, H, Dq});
  const View<T, Dev> q2(w.q.data(), Shape{B, Tn, H * Dq});
  if (p.has_q_lora()) {
    w.qa.resize(Shape{B, Tn, cf.q_lora_rank});
    apply(p.q_a, x, w.qa.view());
    apply(p.q_b, forward(p.q_norm, w.qa, w.q_norm), q2);
  } else {
    apply(p.q, x, q2);
  }
  auto q_pe = w.q.view().slice(2, N, Dq);
  forward(p.rope, q_pe, w.positions, q_pe);
  // Latents: kv_norm(c_kv) and RoPE(k_pe) go into the cache.
  w.kva.resize(Shape{B * Tn, C + R});
  apply(p.kv_a, x, View<T, Dev>(w.kva.data(), Shape{B, Tn, C + R}));
  w.kpe.resize(Shape{B * Tn, R});
  forward(p.rope, w.kva.view().slice(1, C, C + R), w.positions, w.kpe.view());
  const auto& latent = forward(p.kv_norm, w.kva.view().slice(1, 0, C), w.kv_norm);
  for (int64_t b = 0; b < B; ++b)
    kv.append(seqs[b], latent.view().slice(0, b * Tn, (b + 1) * Tn), w.kpe.view().slice(0, b * Tn, (b + 1) * Tn));
  // Attention in the latent space.
  w.attn.resize(Shape{B, Tn, H * V});
  MlaImpl<Dev>::absorbed_attention(p, kv, seqs, Tn, w);
  w.y.resize(Shape{B, Tn, cf.dim});
  apply(p.o, w.attn, w.y.view());
  return w.y;
}

}  // namespace r1
