// r1/embedding.hpp: token embedding, y = W[ids].
//
//   forward:   y[n, :] = W[ids[n], :]
//   backward:  dW[ids[n], :] += dy[n, :]   (ids are discrete: there is no dx)
//
// Legend: N tokens (ids may have any rank up to 3; y adds a trailing D), V vocabulary,
// D embedding dim. Token ids are int32_t throughout r1 (DeepSeek-V3's 129,280 fit).
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "tensor.hpp"

namespace r1 {

// ---------------------------------------------------------------------------------------
// Params
template <class T, class Dev = Cpu>
struct Embedding {
  Tensor<T, Dev> weight;  // [V, D]

  Embedding() = default;
  Embedding(int64_t vocab_size, int64_t dim) : weight(Shape{vocab_size, dim}) {
    R1_CHECK(vocab_size > 0 && dim > 0, "[embedding] vocab_size ", vocab_size, " and dim ", dim, " must be positive");
  }

  int64_t vocab_size() const { return weight.size(0); }
  int64_t dim() const { return weight.size(1); }

  template <class F>
  void visit(F&& f) {
    f("weight", weight);
  }
};

// ---------------------------------------------------------------------------------------
// Cache
template <class T, class Dev = Cpu>
struct EmbeddingCache {
  Tensor<int32_t, Dev> ids;
  Tensor<T, Dev> y;
};

R1_DECLARE_IMPL(EmbeddingImpl, "embedding.cuh");

template <>
struct EmbeddingImpl<Cpu> {
  template <class T>
  static void forward(const Embedding<T, Cpu>& p, EmbeddingCache<T, Cpu>& c) {
    const auto w = p.weight.matrix();
    auto y = c.y.matrix();
    for (int64_t n = 0; n < c.ids.numel(); ++n) y.row(n) = w.row(c.ids.data()[n]);
  }

  // Sequential over tokens: repeated ids accumulate in token order for any thread count.
  template <class T>
  static void backward(EmbeddingCache<T, Cpu>& c, View<const T> dy, Embedding<T, Cpu>& g) {
    auto dw = g.weight.matrix();
    const auto dy_m = dy.matrix();
    for (int64_t n = 0; n < c.ids.numel(); ++n) dw.row(c.ids.data()[n]) += dy_m.row(n);
  }
};

template <class T, class Dev>
const Tensor<T, Dev>& forward(const Embedding<T, Dev>& p, ConstView<int32_t, Dev> ids, EmbeddingCache<T, Dev>& c) {
  R1_CHECK(p.weight.rank() == 2, "[embedding.forward] weight has shape ", p.weight.shape(), ", expected [V, D]");
  R1_CHECK(ids.rank() <= 3, "[embedding.forward] ids have shape ", ids.shape(), ", expected rank <= 3");
  R1_CHECK(ids.is_contiguous(), "[embedding.forward] ids of shape ", ids.shape(), " are not contiguous");
  for (int64_t n = 0; n < ids.numel(); ++n) {
    const int32_t id = ids.data()[n];
    R1_CHECK(0 <= id && id < p.vocab_size(), "[embedding.forward] id ", id, " at position ", n, " is out of range [0, ",
             p.vocab_size(), ")");
  }
  c.ids.resize(ids.shape());
  std::copy(ids.data(), ids.data() + ids.numel(), c.ids.data());
  Shape out = ids.shape();
  out.dims[out.rank++] = p.dim();
  c.y.resize(out);
  EmbeddingImpl<Dev>::forward(p, c);
  return c.y;
}

template <class T, class Dev>
void backward(const Embedding<T, Dev>& p, EmbeddingCache<T, Dev>& c, ConstView<T, Dev> dy, Embedding<T, Dev>& grads) {
  R1_CHECK(c.y.data() != nullptr, "[embedding.backward] the cache holds no forward pass: call forward first");
  R1_CHECK(dy.shape() == c.y.shape(), "[embedding.backward] dy has shape ", dy.shape(), ", expected ", c.y.shape());
  R1_CHECK(grads.weight.shape() == p.weight.shape(), "[embedding.backward] grads.weight has shape ", grads.weight.shape(),
           ", expected ", p.weight.shape());
  EmbeddingImpl<Dev>::backward(c, dy, grads);
}

}  // namespace r1
