// r1/rope.hpp: rotary position embedding (RoPE) with DeepSeek-V3's YaRN extension.
//
//   inv_freq[i] = theta^(-2i/d),  i in [0, d/2)
//   angle[t,i]  = pos[t] * inv_freq[i]
//   each pair (u, v) of x[t,h,:] -> s * (u cos - v sin,  u sin + v cos),  angle[t,i]
//
// Two pairings, chosen by RopeStyle:
//   Interleaved  pairs (x[2i], x[2i+1]): DeepSeek-V3's official inference code (a complex
//                multiply) and HF's rope_interleave=true. The output keeps x's layout.
//   Half         pairs (x[i], x[i+d/2]): HF's rotate_half (Llama, Qwen).
//
// YaRN (rope_scaling.type = "yarn", factor > 1) blends interpolated and original
// frequencies per dimension, exactly as DeepSeek-V3:
//   corr(r) = d ln(orig / (2 pi r)) / (2 ln theta)
//   low = max(floor(corr(beta_fast)), 0),  high = min(ceil(corr(beta_slow)), d-1)
//   ramp[i] = clamp((i - low) / (high - low), 0, 1),  smooth = 1 - ramp
//   inv_freq = inv_freq / factor * (1 - smooth) + inv_freq * smooth
//   mscale(f, m) = 0.1 m ln(f) + 1 (1 when f <= 1)
//   s = mscale(f, mscale) / mscale(f, mscale_all_dim)     (HF's cos/sin scale; 1 for V3)
//   softmax scale = qk_head_dim^-1/2 * mscale(f, mscale_all_dim)^2  (attention_scale())
// DeepSeek's own code applies YaRN only when max_seq_len > original_max_position_embeddings;
// r1 follows HF and applies it whenever it is configured.
//
// Backward: every pair is rotated (and scaled by s), so dx is dy rotated by -angle, times s.
//
// Legend: N tokens, H heads, d rope dim (even). x is [N, d], [N, H, d] or [B, S, H, d]
// (then N = B*S); positions has N entries. Angles are computed in double.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <cmath>
#include <numbers>
#include <vector>

namespace r1 {

enum class RopeStyle { Interleaved, Half };

struct RopeConfig {
  int64_t dim = 64;  // rope head dim d (DeepSeek-V3: qk_rope_head_dim = 64)
  double theta = 10000.0;
  RopeStyle style = RopeStyle::Interleaved;
  // YaRN; factor <= 1 turns it off.
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

inline double yarn_mscale(double factor, double mscale) { return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

// ---------------------------------------------------------------------------------------
// Params: no trainable tensors, only the frequencies derived from the config.
struct Rope {
  RopeConfig config;
  std::vector<double> inv_freq;  // [d/2]
  double cos_sin_scale = 1.0;

  Rope() = default;
  explicit Rope(const RopeConfig& c) : config(c) {
    R1_CHECK(c.dim > 0 && c.dim % 2 == 0, "[rope] dim is ", c.dim, ", expected a positive even number");
    R1_CHECK(c.theta > 1.0, "[rope] theta is ", c.theta, ", expected > 1");
    const int64_t half = c.dim / 2;
    inv_freq.resize(half);
    for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(c.theta, -2.0 * static_cast<double>(i) / static_cast<double>(c.dim));
    if (c.factor > 1.0) {
      R1_CHECK(c.original_max_position_embeddings > 0 && c.beta_fast > c.beta_slow && c.beta_slow > 0.0,
               "[rope] invalid YaRN config: original_max_position_embeddings ", c.original_max_position_embeddings,
               ", beta_fast ", c.beta_fast, ", beta_slow ", c.beta_slow, " (expected > 0 and beta_fast > beta_slow > 0)");
      const auto [low, high] = yarn_range();
      const double span = low == high ? 0.001 : high - low;
      for (int64_t i = 0; i < half; ++i) {
        const double ramp = std::clamp((static_cast<double>(i) - low) / span, 0.0, 1.0);
        const double smooth = 1.0 - ramp;
        inv_freq[i] = inv_freq[i] / c.factor * (1.0 - smooth) + inv_freq[i] * smooth;
      }
      cos_sin_scale = yarn_mscale(c.factor, c.mscale) / yarn_mscale(c.factor, c.mscale_all_dim);
    }
  }

  // The YaRN correction range [low, high] in rotation-pair indices, after clamping.
  std::pair<double, double> yarn_range() const {
    const double d = static_cast<double>(config.dim);
    const auto correction_dim = [&](double rotations) {
      return d * std::log(static_cast<double>(config.original_max_position_embeddings) / (rotations * 2.0 * std::numbers::pi)) /
             (2.0 * std::log(config.theta));
    };
    const double low = std::max(std::floor(correction_dim(config.beta_fast)), 0.0);
    const double high = std::min(std::ceil(correction_dim(config.beta_slow)), d - 1.0);
    return {low, high};
  }

  // Softmax scale for attention over heads of qk_head_dim (DeepSeek-V3: nope 128 + rope 64).
  double attention_scale(int64_t qk_head_dim) const {
    const double m = yarn_mscale(config.factor, config.mscale_all_dim);
    return m * m / std::sqrt(static_cast<double>(qk_head_dim));
  }
};

R1_DECLARE_IMPL(RopeImpl, "rope.cuh");

template <>
struct RopeImpl<Cpu> {
  // y = rotate(x, sign * angle) * scale, one token row (all heads) at a time. y may alias x.
  template <class T>
  static void rotate(const Rope& rope, View<const T> x, View<const int32_t> positions, View<T> y, double sign) {
    const auto xm = x.matrix();  // [N*H, d]
    auto ym = y.matrix();
    const int64_t half = rope.config.dim / 2;
    const int64_t heads = xm.rows() / std::max<int64_t>(positions.numel(), 1);
    const bool interleaved = rope.config.style == RopeStyle::Interleaved;
    parallel_for(positions.numel(), [&](int64_t begin, int64_t end) {
      std::vector<T> cos_t(half), sin_t(half);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < half; ++i) {
          const double angle = static_cast<double>(positions.data()[t]) * rope.inv_freq[i];
          cos_t[i] = static_cast<T>(std::cos(angle) * rope.cos_sin_scale);
          sin_t[i] = static_cast<T>(sign * std::sin(angle) * rope.cos_sin_scale);
        }
        for (int64_t row = t * heads; row < (t + 1) * heads; ++row) {
          for (int64_t i = 0; i < half; ++i) {
            const int64_t a = interleaved ? 2 * i : i;
            const int64_t b = interleaved ? 2 * i + 1 : i + half;
            const T u = xm(row, a), v = xm(row, b);
            ym(row, a) = u * cos_t[i] - v * sin_t[i];
            ym(row, b) = u * sin_t[i] + v * cos_t[i];
          }
        }
      }
    }, min_items_per_thread(xm.cols() * heads + 16 * half));
  }
};

namespace detail {
template <class T, class Dev>
void check_rope_args(const Rope& rope, const View<const T, Dev>& x, const View<const int32_t, Dev>& positions,
                     const View<T, Dev>& y, const char* op) {
  R1_CHECK(!rope.inv_freq.empty(), "[", op, "] the Rope was default-constructed: build it from a RopeConfig");
  R1_CHECK(x.rank() >= 2 && x.rank() <= 4 && x.size(x.rank() - 1) == rope.config.dim, "[", op, "] input has shape ", x.shape(),
           ", expected [N, d], [N, H, d] or [B, S, H, d] with d = ", rope.config.dim);
  const int64_t tokens = x.rank() == 2 ? x.size(0) : x.numel() / (x.size(x.rank() - 1) * x.size(x.rank() - 2));
  R1_CHECK(positions.rank() == 1 && positions.numel() == tokens, "[", op, "] positions have shape ", positions.shape(),
           ", expected [", tokens, "] for input ", x.shape());
  R1_CHECK(positions.is_contiguous(), "[", op, "] positions are not contiguous");
  check_shape(y, x.shape(), op, "output");
}
}  // namespace detail

// y = RoPE(x) at the given positions; y may be x itself (in-place). T and Dev come from y,
// so pass a View (tensor.view() or a slice such as q.view().slice(2, nope, nope + d)).
template <class T, class Dev>
void forward(const Rope& rope, ConstView<T, Dev> x, ConstView<int32_t, Dev> positions, View<T, Dev> y) {
  detail::check_rope_args(rope, x, positions, y, "rope.forward");
  RopeImpl<Dev>::rotate(rope, x, positions, y, +1.0);
}

// dx = RoPE^T(dy); dx may be dy itself.
template <class T, class Dev>
void backward(const Rope& rope, ConstView<int32_t, Dev> positions, ConstView<T, Dev> dy, View<T, Dev> dx) {
  detail::check_rope_args(rope, dy, positions, dx, "rope.backward");
  RopeImpl<Dev>::rotate(rope, dy, positions, dx, -1.0);
}

}  // namespace r1
