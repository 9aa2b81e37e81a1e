// r1/cuda/grpo.cuh: GrpoImpl<Cuda>, the per-token GRPO loss and its gradient w.r.t. the
// log-probs on the GPU.
//
// The maths is grpo.hpp's, through the same R1_HOST_DEVICE functions the CPU loop calls
// (detail::token_weight, detail::surrogate, detail::kl_term): per token (b, t) with mask m,
//   log rho = clamp(lp - old, -20, 20)  (token)  or  clamp(mean_t m (lp - old), -20, 20) (GSPO)
//   L = clipped surrogate(rho, A) + beta k(lp, ref),   loss = sum w(b, t) L
// and d loss / d lp for dloss = 1, plus TRL's metrics. Three kernels, no atomics on floats:
//   1. one CTA per completion: its length |o_b| (after truncation masking), its mean log
//      ratio (GSPO), and the first mask value that is neither 0 nor 1
//   2. one CTA per completion: every token's loss and gradient (each CTA sums the B lengths
//      itself for the batch's token count), the completion's partial sums
//   3. one CTA: the partial sums of the completions in a fixed order, copied back to the host
// The totals agree with the CPU's sequential double sums to rounding (~1e-15 relative).
//
// Legend: B completions, T (L in the code) completion tokens, A advantages.
//
// Provides: GrpoImpl<Cuda> for r1::forward / r1::backward(const GrpoLoss&, ...) with
// GrpoInputs<float|double, Cuda> and GrpoCache<float|double, Cuda>. Input views may be
// strided; advantages are [B] or [B, T]. The truncated flags go up once per call (B values).
#pragma once

#include "tensor.cuh"
#include "../grpo.hpp"
#include "loss.cuh"  // r1::rows helpers

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace r1 {

namespace grpo_kernels {

inline constexpr int kThreads = 256;

// Element (b, t) of a [B, T] view, or b of a [B] view (col = 0); data == nullptr: absent.
template <class T>
struct Matrix {
  const T* data = nullptr;
  int64_t row = 0, col = 0;
  __device__ double operator()(int64_t b, int64_t t) const { return static_cast<double>(data[b * row + t * col]); }
};

template <class T>
Matrix<T> matrix_of(const View<const T, Cuda>& v) {
  if (v.empty()) return {};
  return {v.data(), v.strides()[0], v.rank() == 2 ? v.strides()[1] : 0};
}

struct Options {
  int64_t completions = 0, tokens_per_completion = 0;
  LossType loss_type = LossType::Dapo;
  bool drop_truncated = false, sequence = false, has_old = false, use_kl = false, has_entropy = false;
  KlEstimator kl_estimator = KlEstimator::K3;
  double beta = 0.0, token_count = 0.0, max_completion_length = 0.0;
  detail::ClipBounds clip{};
};

// Partial sums of one completion (and, after kernel 3, of the batch).
enum Partial { kLoss, kClipLow, kClipHigh, kClipRegion, kClipDual, kKl, kEntropy, kPartials };

struct Partials {
  double v[kPartials + 1];  // + the sequence-level sum_t w dl/drho, which stays in its CTA
};

struct AddPartials {
  __device__ Partials operator()(Partials a, const Partials& b) const {
    for (int k = 0; k <= kPartials; ++k) a.v[k] += b.v[k];
    return a;
  }
};

// The workspace (doubles): dropped flags [B], lengths [B], mean log ratios [B], first bad
// mask column per completion [B] (+inf: none), partial sums [B, kPartials], totals.
enum Total { kTotalTokens = kPartials, kTotalFirstBad, kTotals };

struct Workspace {
  int64_t completions;
  __host__ __device__ int64_t dropped() const { return 0; }
  __host__ __device__ int64_t lengths() const { return completions; }
  __host__ __device__ int64_t log_ratios() const { return 2 * completions; }
  __host__ __device__ int64_t first_bad() const { return 3 * completions; }
  __host__ __device__ int64_t partials() const { return 4 * completions; }
  __host__ __device__ int64_t totals() const { return (4 + kPartials) * completions; }
  __host__ __device__ int64_t size() const { return totals() + kTotals; }
};

// The mask with truncated completions zeroed when the loss drops them.
__device__ inline double effective_mask(double m, const Options& o, const double* ws, int64_t b) {
  return o.drop_truncated && ws[Workspace{o.completions}.dropped() + b] != 0.0 ? 0.0 : m;
}

template <class T>
__global__ void completion_stats(Matrix<T> mask, Matrix<T> log_probs, Matrix<T> old_log_probs, Options o, double* ws) {
  const Workspace layout{o.completions};
  const int64_t b = blockIdx.x, L = o.tokens_per_completion;
  double length = 0.0, log_ratio = 0.0, first_bad = std::numeric_limits<double>::infinity();
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) {
    const double m = mask(b, t);
    if (!(m == 0.0 || m == 1.0) && first_bad > static_cast<double>(t)) first_bad = static_cast<double>(t);
    const double em = effective_mask(m, o, ws, b);
    length += em;
    if (o.sequence && o.has_old && em != 0.0) log_ratio += log_probs(b, t) - old_log_probs(b, t);
  }
  length = rows::block_reduce<kThreads>(length, rows::Sum{});
  log_ratio = rows::block_reduce<kThreads>(log_ratio, rows::Sum{});
  first_bad = rows::block_reduce<kThreads>(first_bad, rows::Min{});
  if (threadIdx.x == 0) {
    ws[layout.lengths() + b] = length;
    ws[layout.log_ratios() + b] = log_ratio / detail::max_of(1.0, length);
    ws[layout.first_bad() + b] = first_bad;
  }
}

template <class T>
__global__ void token_loss(Matrix<T> mask, Matrix<T> log_probs, Matrix<T> old_log_probs, Matrix<T> ref_log_probs,
                           Matrix<T> advantages, Matrix<T> entropy, Options o, double* ws, T* grad) {
  const Workspace layout{o.completions};
  const int64_t b = blockIdx.x, L = o.tokens_per_completion;
  double tokens = 0.0;
  for (int64_t j = threadIdx.x; j < o.completions; j += blockDim.x) tokens += ws[layout.lengths() + j];
  tokens = rows::block_reduce<kThreads>(tokens, rows::Sum{});
  const double token_norm = detail::max_of(1.0, tokens), batch = static_cast<double>(o.completions);
  const double length = ws[layout.lengths() + b], seq_log_ratio = ws[layout.log_ratios() + b];

  Partials p{};
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) {
    const double m = effective_mask(mask(b, t), o, ws, b);
    if (m == 0.0) {
      grad[b * L + t] = T(0);
      continue;
    }
    const double w = detail::token_weight(o.loss_type, m, batch, length, tokens, o.token_count, o.max_completion_length);
    const double lp = log_probs(b, t);
    const double raw = o.sequence ? seq_log_ratio : o.has_old ? lp - old_log_probs(b, t) : 0.0;
    const double x = detail::clamp_to(raw, -20.0, 20.0);
    const double rho = exp(x), drho = x == raw ? rho : 0.0;
    const detail::Surrogate s = detail::surrogate(o.clip, rho, advantages(b, t));
    double value = s.value, g = 0.0;
    if (o.sequence) {
      p.v[kPartials] += w * s.grad;
    } else {
      g = w * s.grad * drho;
      const double share = 1.0 / token_norm;
      p.v[kClipLow] += s.low * share;
      p.v[kClipHigh] += s.high * share;
      p.v[kClipRegion] += (s.low || s.high) * share;
      p.v[kClipDual] += s.dual * share;
    }
    if (o.use_kl) {
      const detail::KlTerm k = detail::kl_term(o.kl_estimator, lp, ref_log_probs(b, t));
      value += o.beta * k.value;
      g += w * o.beta * k.grad;
      p.v[kKl] += k.value / token_norm;
    }
    if (o.has_entropy) p.v[kEntropy] += entropy(b, t) / token_norm;
    p.v[kLoss] += w * value;
    grad[b * L + t] = static_cast<T>(g);
  }
  p = rows::block_reduce<kThreads>(p, AddPartials{});
  if (o.sequence) {
    // d log rho[b] / d lp[b, t] = m / max(1, |o_b|) inside the clamp; each thread adds to
    // the tokens it wrote above.
    const double x = detail::clamp_to(seq_log_ratio, -20.0, 20.0), rho = exp(x);
    const double spread = x == seq_log_ratio ? p.v[kPartials] * rho / detail::max_of(1.0, length) : 0.0;
    for (int64_t t = threadIdx.x; t < L; t += blockDim.x)
      if (effective_mask(mask(b, t), o, ws, b) != 0.0) grad[b * L + t] += static_cast<T>(spread);
    // TRL counts clipping per completion at sequence level.
    const detail::Surrogate s = detail::surrogate(o.clip, rho, advantages(b, 0));
    p.v[kClipLow] += s.low / batch;
    p.v[kClipHigh] += s.high / batch;
    p.v[kClipRegion] += (s.low || s.high) / batch;
    p.v[kClipDual] += s.dual / batch;
  }
  if (threadIdx.x == 0)
    for (int k = 0; k < kPartials; ++k) ws[layout.partials() + b * kPartials + k] = p.v[k];
}

// One CTA: the batch totals, the token count, and the first bad mask element (row-major
// index, -1 if none).
__global__ void batch_totals(Options o, double* ws) {
  const Workspace layout{o.completions};
  const int64_t L = o.tokens_per_completion;
  Partials p{};
  double first_bad = std::numeric_limits<double>::infinity();
  for (int64_t b = threadIdx.x; b < o.completions; b += blockDim.x) {
    for (int k = 0; k < kPartials; ++k) p.v[k] += ws[layout.partials() + b * kPartials + k];
    p.v[kPartials] += ws[layout.lengths() + b];
    const double bad_column = ws[layout.first_bad() + b];
    if (bad_column < std::numeric_limits<double>::infinity() && first_bad == std::numeric_limits<double>::infinity())
      first_bad = static_cast<double>(b) * static_cast<double>(L) + bad_column;
  }
  p = rows::block_reduce<kThreads>(p, AddPartials{});
  first_bad = rows::block_reduce<kThreads>(first_bad, rows::Min{});
  if (threadIdx.x == 0) {
    for (int k = 0; k <= kPartials; ++k) ws[layout.totals() + k] = p.v[k];  // kPartials: kTotalTokens
    ws[layout.totals() + kTotalFirstBad] = first_bad < std::numeric_limits<double>::infinity() ? first_bad : -1.0;
  }
}

template <class T>
__global__ void scale(const T* in, T factor, T* out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = in[i] * factor;
}

}  // namespace grpo_kernels

template <>
struct GrpoImpl<Cuda> {
  // The loss over inputs the public forward validated; fills c.metrics and c.dloss_dlog_probs.
  template <class T>
  static T forward(const GrpoLoss& loss, const GrpoInputs<T, Cuda>& in, GrpoCache<T, Cuda>& c) {
    namespace k = grpo_kernels;
    const int64_t B = in.log_probs.size(0), L = in.log_probs.size(1);
    R1_CHECK(static_cast<double>(B) * static_cast<double>(L) < 0x1p53, "[grpo.forward] ", B, " x ", L,
             " tokens exceed the CUDA path's index range");
    const k::Workspace layout{B};
    c.workspace.resize(Shape{layout.size()});
    c.dloss_dlog_probs.resize(Shape{B, L});  // every element is written by token_loss

    k::Options o;
    o.drop_truncated = loss.mask_truncated_completions;
    if (o.drop_truncated) {
      std::vector<double> dropped(static_cast<std::size_t>(B));
      for (int64_t b = 0; b < B; ++b) dropped[b] = in.truncated[b] ? 1.0 : 0.0;
      rows::upload(c.workspace.data() + layout.dropped(), dropped.data(), dropped.size() * sizeof(double), "grpo.forward");
    }
    o.completions = B;
    o.tokens_per_completion = L;
    o.loss_type = loss.loss_type;
    o.sequence = loss.importance_sampling_level == ImportanceSampling::Sequence;
    o.has_old = !in.old_log_probs.empty();
    o.use_kl = loss.beta > 0.0;
    o.has_entropy = !in.entropy.empty();
    o.kl_estimator = loss.kl_estimator;
    o.beta = loss.beta;
    o.token_count = in.token_count;
    o.max_completion_length = static_cast<double>(loss.max_completion_length);
    o.clip = detail::clip_bounds(loss);

    const auto mask = k::matrix_of(in.mask), lp = k::matrix_of(in.log_probs), old = k::matrix_of(in.old_log_probs);
    const auto grid = rows::row_grid(B, "grpo.forward");
    k::completion_stats<T><<<grid, k::kThreads, 0, cuda_stream()>>>(mask, lp, old, o, c.workspace.data());
    R1_CUDA_CHECK_LAUNCH("grpo.forward");
    k::token_loss<T><<<grid, k::kThreads, 0, cuda_stream()>>>(mask, lp, old, k::matrix_of(in.ref_log_probs),
                                                              k::matrix_of(in.advantages), k::matrix_of(in.entropy), o,
                                                              c.workspace.data(), c.dloss_dlog_probs.data());
    R1_CUDA_CHECK_LAUNCH("grpo.forward");
    k::batch_totals<<<1, k::kThreads, 0, cuda_stream()>>>(o, c.workspace.data());
    R1_CUDA_CHECK_LAUNCH("grpo.forward");

    double totals[k::kTotals];
    rows::download(totals, c.workspace.data() + layout.totals(), sizeof(totals), "grpo.forward");
    if (totals[k::kTotalFirstBad] >= 0.0) {
      const auto index = static_cast<int64_t>(totals[k::kTotalFirstBad]);
      const int64_t b = index / L, t = index % L;
      T value{};
      rows::download(&value, in.mask.data() + b * in.mask.strides()[0] + t * in.mask.strides()[1], sizeof(T), "grpo.forward");
      R1_CHECK(false, "[grpo.forward] mask(", b, ", ", t, ") is ", static_cast<double>(value), ", expected 0 or 1");
    }
    GrpoMetrics& metrics = c.metrics;
    metrics = GrpoMetrics{};
    metrics.loss = totals[k::kLoss];
    metrics.tokens = totals[k::kTotalTokens];
    metrics.clip_ratio_low = totals[k::kClipLow];
    metrics.clip_ratio_high = totals[k::kClipHigh];
    metrics.clip_ratio_region = totals[k::kClipRegion];
    metrics.clip_ratio_dual = totals[k::kClipDual];
    metrics.kl = totals[k::kKl];
    metrics.entropy = totals[k::kEntropy];
    return static_cast<T>(metrics.loss);
  }

  template <class T>
  static void scale_gradient(ConstView<T, Cuda> dloss_dlog_probs, T dloss, View<T, Cuda> dlog_probs) {
    const int64_t n = dloss_dlog_probs.numel();
    if (n == 0) return;
    grpo_kernels::scale<T><<<cuda_blocks(n), 256, 0, cuda_stream()>>>(dloss_dlog_probs.data(), dloss, dlog_probs.data(), n);
    R1_CUDA_CHECK_LAUNCH("grpo.backward");
  }
};

}  // namespace r1
