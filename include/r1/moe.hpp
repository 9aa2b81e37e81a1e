// r1/moe.hpp: DeepSeekMoE, the mixture-of-experts FFN of DeepSeek-V2/V3.
//
//   gate:      l = x W_g^T                                   [N, E]
//              s = sigmoid(l)  or  softmax(l)                (scoring_func)
//              c = s + b                                     (selection scores; b is
//                                                             e_score_correction_bias, noaux_tc only)
//   routing:   group score = sum of the top-2 c in each of n_group groups (noaux_tc), or the
//              max s (group_limited_greedy); keep the topk_group best groups, mask the
//              rest to -inf, then take the top-k experts by c (greedy: no groups)
//   weights:   w_j = s[idx_j]  (the unbiased scores: b only selects)
//              w_j /= sum_j w_j + 1e-20  when norm_topk_prob,  then w_j *= routed_scaling_factor
//   output:    y = sum_j w_j Expert_{idx_j}(x) + Shared(x)
//   Expert, Shared: SwiGLU MLPs (r1::Mlp); the shared experts act as one MLP of width
//   n_shared_experts * moe_intermediate_size.
//
// Dispatch is dropless and sorted: the N*k (token, expert) slots are ordered by expert and,
// within an expert, by token, the tokens are gathered into one contiguous slice per expert,
// each expert runs one GEMM per projection over its slice, and the outputs are combined
// back per token in slot order. Ties in any top-k go to the lower index (the lower expert,
// the lower group), so routing is deterministic.
//
// Backward reaches x, every expert, the shared experts and W_g through the gathered
// weights (and their normalization); the top-k choice itself has no gradient and b gets
// none (it is updated by update_bias, not by gradients).
//
// Balancing:
//   aux-loss-free (V3):  update_bias: b_i += gamma * sign(mean load - load_i) after a step.
//   balance loss:        L = alpha * sum_i f_i P_i, f_i = E / (k T) * (tokens routing to i),
//                        P_i = mean over tokens of s_i / sum_j s_j. seq_aux = true computes
//                        it per sequence (the rows of x[B, S, D]) and averages over B (V3's
//                        sequence-wise loss, alpha 1e-4); false over all tokens (V2's
//                        expert-level loss). aux_loss_alpha = 0 turns it off. forward adds
//                        nothing to y; the loss is in cache.aux_loss and backward adds its
//                        gradient.
//
// Threads: each routed expert, and the shared experts, run whole on one thread, largest
// first to whichever of r1's threads is free (MoeImpl<Cpu>::run_experts); shared experts
// bigger than one thread's share, and the gate, use all threads inside their GEMMs.
// Results are the same bits for any thread count.
//
// Devices: forward, backward, routing_stats and update_bias check their arguments here and
// run MoeImpl<Dev>; r1/cuda/moe.cuh specializes MoeImpl and MoeCache for r1::Cuda (the
// routing on the device, every expert in one grouped GEMM per projection).
//
// Legend: N tokens (B*S), D dim, E routed experts, k experts per token, G groups,
// H moe_intermediate_size.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "linear.hpp"
#include "mlp.hpp"
#include "parallel.hpp"
#include "tensor.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace r1 {

enum class ScoringFunc { Softmax, Sigmoid };
enum class TopkMethod { Greedy, GroupLimitedGreedy, NoAuxTc };

struct MoeConfig {
  int64_t dim = 0;                    // hidden_size
  int64_t n_routed_experts = 0;
  int64_t moe_intermediate_size = 0;
  int64_t n_shared_experts = 0;
  int64_t num_experts_per_tok = 0;    // k
  ScoringFunc scoring_func = ScoringFunc::Sigmoid;
  TopkMethod topk_method = TopkMethod::NoAuxTc;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  double aux_loss_alpha = 0.0;        // 0: no balance loss
  bool seq_aux = true;

  // Throws r1::error naming the first inconsistency.
  void validate() const {
    R1_CHECK(dim > 0 && n_routed_experts > 0 && moe_intermediate_size > 0, "[moe] dim ", dim, ", n_routed_experts ",
             n_routed_experts, " and moe_intermediate_size ", moe_intermediate_size, " must be positive");
    R1_CHECK(n_shared_experts >= 0, "[moe] n_shared_experts is ", n_shared_experts, ", expected >= 0");
    R1_CHECK(num_experts_per_tok >= 1 && num_experts_per_tok <= n_routed_experts, "[moe] num_experts_per_tok ",
             num_experts_per_tok, " must lie in [1, n_routed_experts = ", n_routed_experts, "]");
    R1_CHECK(routed_scaling_factor > 0.0 && aux_loss_alpha >= 0.0, "[moe] routed_scaling_factor ", routed_scaling_factor,
             " must be > 0 and aux_loss_alpha ", aux_loss_alpha, " >= 0");
    if (topk_method == TopkMethod::Greedy) return;
    R1_CHECK(n_group >= 1 && n_routed_experts % n_group == 0, "[moe] n_group ", n_group, " does not divide n_routed_experts ",
             n_routed_experts);
    R1_CHECK(topk_group >= 1 && topk_group <= n_group, "[moe] topk_group ", topk_group, " must lie in [1, n_group = ", n_group, "]");
    R1_CHECK(topk_group * (n_routed_experts / n_group) >= num_experts_per_tok, "[moe] topk_group ", topk_group, " groups of ",
             n_routed_experts / n_group, " experts cannot hold num_experts_per_tok = ", num_experts_per_tok);
    R1_CHECK(topk_method != TopkMethod::NoAuxTc || n_routed_experts / n_group >= 2, "[moe] noaux_tc scores a group by its top-2 "
             "experts, but groups have ", n_routed_experts / n_group, " expert");
  }
};

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct Moe {
  MoeConfig config;
  Linear<T, Dev> gate;                  // weight [E, D]
  Tensor<T, Dev> e_score_correction_bias;  // [E], a buffer: selection only, set by update_bias
  std::vector<Mlp<T, Dev>> experts;     // E experts of [H, D] / [D, H]
  Mlp<T, Dev> shared_experts;           // width n_shared * H; absent when n_shared_experts = 0

  Moe() = default;
  explicit Moe(const MoeConfig& c) : config(c) {
    c.validate();
    gate = Linear<T, Dev>(c.dim, c.n_routed_experts);
    e_score_correction_bias = Tensor<T, Dev>(Shape{c.n_routed_experts});
    experts.assign(static_cast<std::size_t>(c.n_routed_experts), Mlp<T, Dev>(c.dim, c.moe_intermediate_size));
    if (c.n_shared_experts > 0) shared_experts = Mlp<T, Dev>(c.dim, c.n_shared_experts * c.moe_intermediate_size);
  }

  bool has_shared() const { return config.n_shared_experts > 0; }

  // Trainable tensors, with HF's names under "mlp.".
  template <class F>
  void visit(F&& f) {
    visit_prefixed("gate.", gate, f);
    for (std::size_t e = 0; e < experts.size(); ++e) visit_prefixed("experts." + std::to_string(e) + ".", experts[e], f);
    if (has_shared()) visit_prefixed("shared_experts.", shared_experts, f);
  }
  // Tensors that checkpoints hold but gradients do not touch.
  template <class F>
  void visit_buffers(F&& f) {
    f("gate.e_score_correction_bias", e_score_correction_bias);
  }
};

// ---------------------------------------------------------------------------------------
// Cache, with the routing of the last forward.
template <class T, class Dev = Cpu>
struct MoeCache {
  LinearCache<T, Dev> gate;
  Tensor<T, Dev> scores;             // s [N, E]
  Tensor<int32_t, Dev> topk_idx;     // [N, k], best first
  Tensor<T, Dev> topk_weight;        // [N, k], after normalization and scaling
  std::vector<int64_t> expert_offset;  // [E + 1]: expert e owns sorted slots [offset[e], offset[e+1])
  std::vector<int64_t> slot_of;      // [N*k]: (token n, choice j) -> its sorted slot
  std::vector<int64_t> choice_of;    // [N*k]: sorted slot -> n*k + j (its token is n)
  std::vector<MlpCache<T, Dev>> expert_caches;  // expert e's input, output and dx: its slots' rows, in order
  MlpCache<T, Dev> shared;
  Tensor<T, Dev> y, dx, d_routed, dweight, dscores, dlogits;
  int64_t sequences = 1;             // B: rows of x[B, S, D] for the sequence-wise loss
  double aux_loss = 0.0;
};

// Load statistics of one routing: how many slots each expert took, how uneven that is, and
// the fraction of tokens that sent at least one slot to each group.
struct MoeStats {
  std::vector<int64_t> tokens_per_expert;
  double max_over_mean_load = 0.0;
  std::vector<double> group_fraction;
};

R1_DECLARE_IMPL(MoeImpl, "moe.cuh");

template <>
struct MoeImpl<Cpu> {
  // s from the gate logits, row by row.
  template <class T>
  static void score(const MoeConfig& c, const Tensor<T>& logits, Tensor<T>& scores) {
    const auto l = logits.matrix();
    auto s = scores.matrix();
    parallel_for(l.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (c.scoring_func == ScoringFunc::Sigmoid) {
          s.row(n) = l.row(n).unaryExpr([](T v) { return T(1) / (T(1) + std::exp(-v)); });
        } else {
          const auto e = (l.row(n).array() - l.row(n).maxCoeff()).exp();
          s.row(n) = (e / e.sum()).matrix();
        }
      }
    }, min_items_per_thread(64 * l.cols()));  // a scalar exp costs about as much as 64 vector multiply-adds
  }

  // best[0, k) = indices of the k largest of values[0, n), best first; ties go to the lower
  // index. Insertion into the sorted best k, which at a few dozen experts or groups per token
  // costs a fraction of a sort. A NaN never displaces a value (it only fills a free place).
  static void top_k(const double* values, int64_t n, int64_t k, int32_t* best) {
    int64_t filled = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double v = values[i];
      if (filled == k && !(v > values[best[k - 1]])) continue;
      int64_t place = filled < k ? filled++ : k - 1;
      for (; place > 0 && v > values[best[place - 1]]; --place) best[place] = best[place - 1];
      best[place] = static_cast<int32_t>(i);
    }
  }

  template <class T>
  static void route(const Moe<T, Cpu>& p, MoeCache<T, Cpu>& c) {
    const MoeConfig& cfg = p.config;
    const auto s = c.scores.matrix();
    const int64_t tokens = s.rows(), experts = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
    const int64_t group_size = experts / cfg.n_group;
    const bool use_bias = cfg.topk_method == TopkMethod::NoAuxTc;
    auto idx = c.topk_idx.view();
    auto w = c.topk_weight.view();
    parallel_for(tokens, [&](int64_t begin, int64_t end) {
      std::vector<double> choice(static_cast<std::size_t>(experts)), group_score(static_cast<std::size_t>(cfg.n_group));
      std::vector<int32_t> best(static_cast<std::size_t>(std::max({k, cfg.topk_group, int64_t{2}})));  // 2: noaux_tc's group top-2
      std::vector<char> kept(static_cast<std::size_t>(cfg.n_group));
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t e = 0; e < experts; ++e)
          choice[e] = static_cast<double>(s(n, e)) + (use_bias ? static_cast<double>(p.e_score_correction_bias.data()[e]) : 0.0);
        if (cfg.topk_method != TopkMethod::Greedy) {
          for (int64_t g = 0; g < cfg.n_group; ++g) {
            const double* members = choice.data() + g * group_size;
            top_k(members, group_size, use_bias ? 2 : 1, best.data());
            group_score[g] = use_bias ? members[best[0]] + members[best[1]] : members[best[0]];
          }
          top_k(group_score.data(), cfg.n_group, cfg.topk_group, best.data());
          std::fill(kept.begin(), kept.end(), 0);
          for (int64_t i = 0; i < cfg.topk_group; ++i) kept[best[i]] = 1;
          for (int64_t e = 0; e < experts; ++e)
            if (!kept[e / group_size]) choice[e] = -std::numeric_limits<double>::infinity();
        }
        top_k(choice.data(), experts, k, best.data());
        T total = 0;
        for (int64_t j = 0; j < k; ++j) {
          idx(n, j) = best[j];
          w(n, j) = s(n, best[j]);
          total += w(n, j);
        }
        const T norm = cfg.norm_topk_prob ? T(1) / (total + T(1e-20)) : T(1);
        for (int64_t j = 0; j < k; ++j) w(n, j) *= norm * static_cast<T>(cfg.routed_scaling_factor);
      }
    }, min_items_per_thread(256 * experts));  // compares and branches, not vector work
  }

  // Counting sort of the N*k slots by expert, stable in token order.
  template <class T>
  static void sort_slots(const MoeConfig& cfg, MoeCache<T, Cpu>& c) {
    const int64_t slots = c.topk_idx.numel();
    const int32_t* idx = c.topk_idx.data();
    c.expert_offset.assign(static_cast<std::size_t>(cfg.n_routed_experts + 1), 0);
    for (int64_t i = 0; i < slots; ++i) ++c.expert_offset[idx[i] + 1];
    std::partial_sum(c.expert_offset.begin(), c.expert_offset.end(), c.expert_offset.begin());
    std::vector<int64_t> next(c.expert_offset.begin(), c.expert_offset.end() - 1);
    c.slot_of.resize(static_cast<std::size_t>(slots));
    c.choice_of.resize(static_cast<std::size_t>(slots));
    for (int64_t i = 0; i < slots; ++i) {
      const int64_t slot = next[idx[i]]++;
      c.slot_of[i] = slot;
      c.choice_of[slot] = i;
    }
  }

  // The row of `rows_of(e)` (an expert's [slots of e, D] tensor in its cache) that holds
  // choice i = n*k + j: expert e = idx[i] keeps its slots in sorted order from offset[e].
  template <class T, class RowsOf>
  static auto slot_row(const MoeCache<T, Cpu>& c, int64_t choice, RowsOf&& rows_of) {
    const int32_t e = c.topk_idx.data()[choice];
    const Tensor<T>& rows = rows_of(c.expert_caches[e]);
    const int64_t width = rows.size(1);
    return Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(rows.data() + (c.slot_of[choice] - c.expert_offset[e]) * width,
                                                                 width);
  }

  // y[n] += sum_j w[n,j] * Expert_{idx_j}(x[n]), in j order.
  template <class T>
  static void combine(const MoeCache<T, Cpu>& c, Tensor<T>& y) {
    auto ym = y.matrix();
    const int64_t k = c.topk_idx.size(1);
    const auto output = [](const MlpCache<T, Cpu>& e) -> const Tensor<T>& { return e.down.y; };
    parallel_for(ym.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t j = 0; j < k; ++j) ym.row(n) += c.topk_weight.data()[n * k + j] * slot_row(c, n * k + j, output);
    }, min_items_per_thread(k * ym.cols()));
  }

  // The balance loss and, when wanted, its gradient added into dscores.
  template <class T>
  static double balance_loss(const MoeConfig& cfg, MoeCache<T, Cpu>& c, bool with_gradient) {
    const auto s = c.scores.matrix();
    const int64_t tokens = s.rows(), experts = cfg.n_routed_experts, k = cfg.num_experts_per_tok;
    const int64_t groups = cfg.seq_aux ? c.sequences : 1;
    const int64_t per_group = tokens / groups;
    double loss = 0.0;
    for (int64_t b = 0; b < groups; ++b) {
      std::vector<double> f(static_cast<std::size_t>(experts), 0.0), prob(static_cast<std::size_t>(experts), 0.0);
      for (int64_t n = b * per_group; n < (b + 1) * per_group; ++n) {
        for (int64_t j = 0; j < k; ++j) f[c.topk_idx.data()[n * k + j]] += 1.0;
        const double total = s.row(n).template cast<double>().sum();
        for (int64_t e = 0; e < experts; ++e) prob[e] += static_cast<double>(s(n, e)) / total;
      }
      for (int64_t e = 0; e < experts; ++e) {
        f[e] *= static_cast<double>(experts) / static_cast<double>(k * per_group);
        loss += cfg.aux_loss_alpha * f[e] * prob[e] / static_cast<double>(per_group) / static_cast<double>(groups);
      }
      if (!with_gradient) continue;
      // dL/ds[n,e] = alpha/(T*groups) * (f_e / S_n - sum_m f_m s[n,m] / S_n^2), S_n = sum_m s[n,m]
      const double scale = cfg.aux_loss_alpha / static_cast<double>(per_group) / static_cast<double>(groups);
      auto ds = c.dscores.matrix();
      for (int64_t n = b * per_group; n < (b + 1) * per_group; ++n) {
        const double total = s.row(n).template cast<double>().sum();
        double weighted = 0.0;
        for (int64_t e = 0; e < experts; ++e) weighted += f[e] * static_cast<double>(s(n, e));
        for (int64_t e = 0; e < experts; ++e)
          ds(n, e) += static_cast<T>(scale * (f[e] / total - weighted / (total * total)));
      }
    }
    return loss;
  }

  // dscores[n, idx_j] from the gradient of the combine weights (through the normalization).
  template <class T>
  static void weight_backward(const MoeConfig& cfg, MoeCache<T, Cpu>& c) {
    const int64_t tokens = c.topk_idx.size(0), k = cfg.num_experts_per_tok;
    auto ds = c.dscores.matrix();
    const auto s = c.scores.matrix();
    const T scale = static_cast<T>(cfg.routed_scaling_factor);
    parallel_for(tokens, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int32_t* idx = c.topk_idx.data() + n * k;
        const T* dw = c.dweight.data() + n * k;
        if (!cfg.norm_topk_prob) {
          for (int64_t j = 0; j < k; ++j) ds(n, idx[j]) += scale * dw[j];
          continue;
        }
        // w_j = scale * s_j / Z, Z = sum_i s_i + 1e-20: dw/ds_i = scale * (delta_ij / Z - s_j / Z^2)
        T z = T(1e-20), dot = 0;
        for (int64_t j = 0; j < k; ++j) z += s(n, idx[j]);
        for (int64_t j = 0; j < k; ++j) dot += dw[j] * s(n, idx[j]);
        for (int64_t j = 0; j < k; ++j) ds(n, idx[j]) += scale * (dw[j] / z - dot / (z * z));
      }
    }, min_items_per_thread(4 * k));
  }

  // dlogits from dscores through sigmoid or softmax.
  template <class T>
  static void score_backward(const MoeConfig& cfg, MoeCache<T, Cpu>& c) {
    const auto s = c.scores.matrix();
    const auto ds = c.dscores.matrix();
    auto dl = c.dlogits.matrix();
    parallel_for(s.rows(), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (cfg.scoring_func == ScoringFunc::Sigmoid) {
          dl.row(n) = (ds.row(n).array() * s.row(n).array() * (T(1) - s.row(n).array())).matrix();
        } else {
          const T dot = ds.row(n).dot(s.row(n));
          dl.row(n) = (s.row(n).array() * (ds.row(n).array() - dot)).matrix();
        }
      }
    }, min_items_per_thread(4 * s.cols()));
  }

  // Runs routed(e, begin, end) for every expert e with slots [begin, end), and shared() for
  // the shared experts when shared_rows > 0, each task whole on one of r1's threads: at a few
  // hundred rows per expert that beats splitting each small GEMM across threads (no barrier
  // between projections, no operand packed twice), and the results are the same bits either
  // way. Tasks go largest first to whichever thread is free, so the threads finish within
  // about one small expert of each other. shared_rows counts tokens times n_shared_experts,
  // in the routed slots' units. When the shared experts alone are more than one thread's
  // share they run first, across all threads, instead.
  template <class Routed, class Shared>
  static void run_experts(const std::vector<int64_t>& offset, int64_t shared_rows, Routed&& routed, Shared&& shared) {
    constexpr int64_t kShared = -1;
    const auto experts = static_cast<int64_t>(offset.size()) - 1;
    if (shared_rows > 0 && shared_rows * num_threads() > offset.back() + shared_rows) {
      shared();
      shared_rows = 0;
    }
    struct Task {
      int64_t rows, expert;
    };
    std::vector<Task> tasks;
    if (shared_rows > 0) tasks.push_back({shared_rows, kShared});
    for (int64_t e = 0; e < experts; ++e)
      if (offset[e + 1] > offset[e]) tasks.push_back({offset[e + 1] - offset[e], e});
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.rows > b.rows; });
    std::atomic<std::size_t> next{0};
    parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t, int64_t) {
      for (std::size_t i = next++; i < tasks.size(); i = next++) {
        const int64_t e = tasks[i].expert;
        if (e == kShared) {
          shared();
        } else {
          routed(e, offset[e], offset[e + 1]);
        }
      }
    });
  }

  // The layer on the host: one forward (and backward) per expert over its sorted slice.
  template <class T>
  static void layer_forward(const Moe<T, Cpu>& p, ConstView<T, Cpu> x, MoeCache<T, Cpu>& c) {
    const MoeConfig& cfg = p.config;
    const int64_t tokens = x.numel() / cfg.dim, k = cfg.num_experts_per_tok;
    const auto& logits = forward(p.gate, x, c.gate);
    c.scores.resize(logits.shape());
    score(cfg, logits, c.scores);
    c.topk_idx.resize(Shape{tokens, k});
    c.topk_weight.resize(Shape{tokens, k});
    route(p, c);
    sort_slots(cfg, c);

    // Each expert gathers its own tokens straight into its cache (on its thread, just before
    // it reads them) and leaves its output there for combine.
    c.expert_caches.resize(p.experts.size());
    c.y.resize(x.shape());
    const auto xm = c.gate.x.matrix();
    run_experts(
        c.expert_offset, p.has_shared() ? tokens * cfg.n_shared_experts : 0,
        [&](int64_t e, int64_t begin, int64_t end) {
          MlpCache<T, Cpu>& ec = c.expert_caches[e];
          ec.gate.x.resize(Shape{end - begin, cfg.dim});
          auto routed = ec.gate.x.matrix();
          for (int64_t slot = begin; slot < end; ++slot) routed.row(slot - begin) = xm.row(c.choice_of[slot] / k);
          forward_on_cached_input(p.experts[e], ec);
        },
        [&] { c.y.matrix() = forward(p.shared_experts, x, c.shared).matrix(); });
    if (!p.has_shared()) c.y.set_zero();
    combine(c, c.y);
    c.aux_loss = cfg.aux_loss_alpha > 0.0 ? balance_loss(cfg, c, /*with_gradient=*/false) : 0.0;
  }

  template <class T>
  static void layer_backward(const Moe<T, Cpu>& p, MoeCache<T, Cpu>& c, ConstView<T, Cpu> dy, Moe<T, Cpu>& grads) {
    const MoeConfig& cfg = p.config;
    const int64_t tokens = c.topk_idx.size(0), k = cfg.num_experts_per_tok;
    const auto dy_m = dy.matrix();

    // Experts: each first takes, per slot of its slice, the gradient of its output row,
    // w * dy[token], and dw = dy[token] . output row, then runs its backward, which leaves
    // the rows' input gradients in its cache; the shared experts' backward gives dx its
    // first term.
    c.dweight.resize(Shape{tokens, k});
    c.d_routed.resize(Shape{tokens * k, cfg.dim});
    c.dx.resize(c.y.shape());
    auto dr = c.d_routed.matrix();
    run_experts(
        c.expert_offset, p.has_shared() ? tokens * cfg.n_shared_experts : 0,
        [&](int64_t e, int64_t begin, int64_t end) {
          const auto out = c.expert_caches[e].down.y.matrix();
          for (int64_t slot = begin; slot < end; ++slot) {
            const int64_t choice = c.choice_of[slot];
            dr.row(slot) = c.topk_weight.data()[choice] * dy_m.row(choice / k);
            c.dweight.data()[choice] = dy_m.row(choice / k).dot(out.row(slot - begin));
          }
          backward(p.experts[e], c.expert_caches[e], c.d_routed.view().slice(0, begin, end), grads.experts[e]);
        },
        [&] { c.dx.matrix() = backward(p.shared_experts, c.shared, dy, grads.shared_experts).matrix(); });
    if (!p.has_shared()) c.dx.set_zero();

    // dx += per token, in j order, the routed input gradients; then the gate path.
    {
      auto dxm = c.dx.matrix();
      const auto input_grad = [](const MlpCache<T, Cpu>& e) -> const Tensor<T>& { return e.dx; };
      parallel_for(tokens, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          for (int64_t j = 0; j < k; ++j) dxm.row(n) += slot_row(c, n * k + j, input_grad);
      }, min_items_per_thread(k * dxm.cols()));
    }

    c.dscores.resize(c.scores.shape(), /*zero=*/true);
    weight_backward(cfg, c);
    if (cfg.aux_loss_alpha > 0.0) balance_loss(cfg, c, /*with_gradient=*/true);
    c.dlogits.resize(c.scores.shape());
    score_backward(cfg, c);
    c.dx.matrix() += backward(p.gate, c.gate, c.dlogits, grads.gate).matrix();
  }

  template <class T>
  static std::vector<int64_t> tokens_per_expert(const MoeConfig& cfg, const MoeCache<T, Cpu>& c) {
    std::vector<int64_t> counts(static_cast<std::size_t>(cfg.n_routed_experts));
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e) counts[e] = c.expert_offset[e + 1] - c.expert_offset[e];
    return counts;
  }

  template <class T>
  static void update_bias(Moe<T, Cpu>& p, const std::vector<int64_t>& tokens_per_expert, double gamma) {
    const double total = static_cast<double>(std::accumulate(tokens_per_expert.begin(), tokens_per_expert.end(), int64_t{0}));
    const double mean = total / static_cast<double>(p.config.n_routed_experts);
    for (int64_t e = 0; e < p.config.n_routed_experts; ++e) {
      const double load = static_cast<double>(tokens_per_expert[e]);
      const double direction = load < mean ? 1.0 : (load > mean ? -1.0 : 0.0);
      p.e_score_correction_bias.data()[e] += static_cast<T>(gamma * direction);
    }
  }
};

// y = MoE(x); x is [N, D] or [B, S, D] (B sequences for the sequence-wise balance loss).
template <class T, class Dev>
const Tensor<T, Dev>& forward(const Moe<T, Dev>& p, ConstView<T, Dev> x, MoeCache<T, Dev>& c) {
  const MoeConfig& cfg = p.config;
  R1_CHECK(cfg.n_routed_experts > 0 && static_cast<int64_t>(p.experts.size()) == cfg.n_routed_experts,
           "[moe.forward] the layer has ", p.experts.size(), " experts, its config ", cfg.n_routed_experts,
           ": build it with Moe(config)");
  R1_CHECK((x.rank() == 2 || x.rank() == 3) && x.size(x.rank() - 1) == cfg.dim, "[moe.forward] x has shape ", x.shape(),
           ", expected [N, ", cfg.dim, "] or [B, S, ", cfg.dim, "]");
  c.sequences = x.rank() == 3 ? x.size(0) : 1;
  MoeImpl<Dev>::layer_forward(p, x, c);
  return c.y;
}

// dy -> dx; accumulates into every expert, the shared experts and the gate weight, and
// adds the balance loss's gradient when aux_loss_alpha > 0.
template <class T, class Dev>
const Tensor<T, Dev>& backward(const Moe<T, Dev>& p, MoeCache<T, Dev>& c, ConstView<T, Dev> dy, Moe<T, Dev>& grads) {
  R1_CHECK(c.y.data() != nullptr, "[moe.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dy.shape() == c.y.shape(), "[moe.backward] dy has shape ", dy.shape(), ", expected ", c.y.shape());
  R1_CHECK(grads.experts.size() == p.experts.size() && grads.has_shared() == p.has_shared(),
           "[moe.backward] grads do not match the layer: build them with r1::zeros_like(params)");
  MoeImpl<Dev>::layer_backward(p, c, dy, grads);
  return c.dx;
}

// Load statistics of the routing in the cache.
template <class T, class Dev>
MoeStats routing_stats(const Moe<T, Dev>& p, const MoeCache<T, Dev>& c) {
  const MoeConfig& cfg = p.config;
  R1_CHECK(c.topk_idx.data() != nullptr, "[moe.routing_stats] the cache holds no forward pass");
  MoeStats stats;
  stats.tokens_per_expert = MoeImpl<Dev>::tokens_per_expert(cfg, c);
  const double mean = static_cast<double>(c.topk_idx.numel()) / static_cast<double>(cfg.n_routed_experts);
  const int64_t max_load = *std::max_element(stats.tokens_per_expert.begin(), stats.tokens_per_expert.end());
  stats.max_over_mean_load = mean > 0.0 ? static_cast<double>(max_load) / mean : 0.0;
  Tensor<int32_t> topk_idx(c.topk_idx.shape());  // on the host, whatever Dev is
  copy(c.topk_idx.view(), topk_idx.view());
  const int64_t tokens = topk_idx.size(0), k = cfg.num_experts_per_tok, group_size = cfg.n_routed_experts / cfg.n_group;
  stats.group_fraction.assign(static_cast<std::size_t>(cfg.n_group), 0.0);
  for (int64_t n = 0; n < tokens; ++n) {
    std::vector<bool> hit(static_cast<std::size_t>(cfg.n_group), false);
    for (int64_t j = 0; j < k; ++j) hit[topk_idx.data()[n * k + j] / group_size] = true;
    for (int64_t g = 0; g < cfg.n_group; ++g) stats.group_fraction[g] += hit[g] ? 1.0 / static_cast<double>(tokens) : 0.0;
  }
  return stats;
}

// Auxiliary-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean load - load_i),
// from per-expert slot counts (summed over a step's micro-batches), or from the routing in
// the cache. Call it once per step, after the optimizer, when you want it.
template <class T, class Dev>
void update_bias(Moe<T, Dev>& p, const std::vector<int64_t>& tokens_per_expert, double gamma = 0.001) {
  R1_CHECK(gamma >= 0.0, "[moe.update_bias] gamma is ", gamma, ", expected >= 0");
  R1_CHECK(p.config.topk_method == TopkMethod::NoAuxTc, "[moe.update_bias] the bias only takes part in routing with "
           "topk_method noaux_tc");
  R1_CHECK(static_cast<int64_t>(tokens_per_expert.size()) == p.config.n_routed_experts, "[moe.update_bias] ",
           tokens_per_expert.size(), " expert counts for ", p.config.n_routed_experts, " experts");
  MoeImpl<Dev>::update_bias(p, tokens_per_expert, gamma);
}

template <class T, class Dev>
void update_bias(Moe<T, Dev>& p, const MoeCache<T, Dev>& c, double gamma = 0.001) {
  update_bias(p, routing_stats(p, c).tokens_per_expert, gamma);
}

}  // namespace r1
