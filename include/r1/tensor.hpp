// r1/tensor.hpp: shapes, owning tensors, non-owning views, Eigen access and seeded fills.
//
//   Shape          up to 4 dims, row-major (the last dim is contiguous), like PyTorch.
//   Tensor<T,Dev>  owns a contiguous, 64-byte aligned buffer on device Dev. Copying a
//                  Tensor copies the data; resize() reuses the buffer when it fits, so
//                  caches and workspaces stop allocating after their first call.
//   View<T,Dev>    pointer + shape + strides; never owns. View<const T> is read-only.
//                  slice() and select() make sub-views without copying; column slices
//                  of a row-major matrix are views with a row stride.
//   .matrix()      an Eigen::Map over a view, RowMajor, leading dims flattened into rows,
//                  so x[B,S,D].matrix() is a (B*S) x D matrix and PyTorch/HF [out, in]
//                  weights map without copies. .vector() maps a contiguous view as one
//                  column vector.
//   Rng, fill_*    xoshiro256** with a normal sampler built only from correctly rounded
//                  IEEE operations (+ - * / sqrt fma), every multiply-add an explicit
//                  std::fma so compilers that contract a*b+c and those that don't agree:
//                  a seed gives the same numbers bit for bit on any platform.
//
// Element types: float, double (for finite-difference tests), and the storage types of
// numeric.hpp (bf16, f16, fp8_e4m3, fp8_e5m2), which convert through float with convert().
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "numeric.hpp"

#include <Eigen/Core>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <typeinfo>

namespace r1 {

inline constexpr int kMaxRank = 4;

struct Shape {
  std::array<int64_t, kMaxRank> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> sizes) {
    R1_CHECK(sizes.size() <= kMaxRank, "[Shape] rank ", sizes.size(), " exceeds the maximum ", kMaxRank);
    for (int64_t s : sizes) {
      R1_CHECK(s >= 0, "[Shape] negative dimension ", s);
      dims[rank++] = s;
    }
  }

  int64_t operator[](int i) const { return dims[i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank != b.rank) return false;
    for (int i = 0; i < a.rank; ++i)
      if (a.dims[i] != b.dims[i]) return false;
    return true;
  }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
  }
};

}  // namespace r1

template <>
struct fmt::formatter<r1::Shape> : fmt::formatter<std::string> {
  auto format(const r1::Shape& s, fmt::format_context& ctx) const { return fmt::formatter<std::string>::format(s.str(), ctx); }
};

namespace r1 {

// ---------------------------------------------------------------------------------------
// Memory: allocation and copies per device. The CUDA specialization is in r1/cuda/tensor.cuh.
R1_DECLARE_IMPL(Memory, "tensor.cuh");

template <>
struct Memory<Cpu> {
  static constexpr std::size_t alignment = 64;
  static void* allocate(std::size_t bytes) {
    const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + alignment - 1) / alignment * alignment;
    void* p = std::aligned_alloc(alignment, rounded);
    R1_CHECK(p != nullptr, "[Tensor] failed to allocate ", bytes, " bytes");
    return p;
  }
  static void deallocate(void* p) { std::free(p); }
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  static void zero(void* dst, std::size_t bytes) {
    if (bytes) std::memset(dst, 0, bytes);
  }
};

template <class T>
using RowMatrix = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using ColVector = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, 1>;

// Map types that keep the constness of T: a View<const float> maps as a read-only matrix.
template <class T>
using MatrixMap = Eigen::Map<std::conditional_t<std::is_const_v<T>, const RowMatrix<T>, RowMatrix<T>>, Eigen::Unaligned,
                             Eigen::OuterStride<>>;
template <class T>
using VectorMap = Eigen::Map<std::conditional_t<std::is_const_v<T>, const ColVector<T>, ColVector<T>>>;

// ---------------------------------------------------------------------------------------
template <class T, class Dev = Cpu>
class View {
 public:
  using value_type = std::remove_const_t<T>;
  using Strides = std::array<int64_t, kMaxRank>;

  View() = default;
  View(T* data, Shape shape) : data_(data), shape_(shape), strides_(contiguous_strides(shape)) {}
  View(T* data, Shape shape, Strides strides) : data_(data), shape_(shape), strides_(strides) {}
  // A View<float> converts to View<const float>, never the reverse.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  View(const View<U, Dev>& other) : data_(other.data()), shape_(other.shape()), strides_(other.strides()) {}

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  const Strides& strides() const { return strides_; }
  int rank() const { return shape_.rank; }
  int64_t size(int dim) const { return shape_[dim]; }
  int64_t numel() const { return shape_.numel(); }
  bool empty() const { return numel() == 0; }

  static Strides contiguous_strides(const Shape& shape) {
    Strides s{};
    int64_t step = 1;
    for (int i = shape.rank - 1; i >= 0; --i) {
      s[i] = step;
      step *= shape[i];
    }
    return s;
  }
  bool is_contiguous() const {
    const Strides c = contiguous_strides(shape_);
    for (int i = 0; i < rank(); ++i)
      if (shape_[i] > 1 && strides_[i] != c[i]) return false;
    return true;
  }

  template <class... Index>
  T& operator()(Index... index) const {
    static_assert(std::is_same_v<Dev, Cpu>, "r1::View: element access is host-only");
    static_assert(sizeof...(Index) <= kMaxRank, "r1::View: too many indices");
    const int64_t idx[] = {static_cast<int64_t>(index)...};
    int64_t offset = 0;
    for (std::size_t i = 0; i < sizeof...(Index); ++i) {
      R1_ASSERT(0 <= idx[i] && idx[i] < shape_[static_cast<int>(i)], "[View()] index ", idx[i], " out of range for dim ", i,
                " of shape ", shape_);
      offset += idx[i] * strides_[i];
    }
    return data_[offset];
  }

  // Elements [begin, end) of dimension dim; shares the data.
  View slice(int dim, int64_t begin, int64_t end) const {
    R1_CHECK(dim >= 0 && dim < rank(), "[View.slice] dim ", dim, " out of range for shape ", shape_);
    R1_CHECK(0 <= begin && begin <= end && end <= shape_[dim], "[View.slice] range [", begin, ", ", end,
             ") out of bounds for dim ", dim, " of shape ", shape_);
    Shape s = shape_;
    s.dims[dim] = end - begin;
    return View(data_ + begin * strides_[dim], s, strides_);
  }

  // Index i of the first dimension, dropping it: x.select(b) of [B,S,D] is [S,D].
  View select(int64_t i) const {
    R1_CHECK(rank() >= 1, "[View.select] on a rank-0 view");
    R1_CHECK(0 <= i && i < shape_[0], "[View.select] index ", i, " out of range for shape ", shape_);
    Shape s;
    Strides st{};
    for (int d = 1; d < rank(); ++d) {
      s.dims[s.rank] = shape_[d];
      st[s.rank++] = strides_[d];
    }
    return View(data_ + i * strides_[0], s, st);
  }

  // Same elements, new shape; needs a contiguous view.
  View reshape(Shape shape) const {
    R1_CHECK(shape.numel() == numel(), "[View.reshape] cannot reshape ", shape_, " to ", shape);
    R1_CHECK(is_contiguous(), "[View.reshape] view of shape ", shape_, " is not contiguous");
    return View(data_, shape);
  }

  // Rows x cols Eigen map. Rank 1 is one row; rank >= 2 flattens the leading dims into
  // rows, which needs them to be laid out back to back. The last dim must be contiguous.
  MatrixMap<T> matrix() const {
    static_assert(std::is_same_v<Dev, Cpu>, "r1::View::matrix: Eigen maps are host-only");
    static_assert(std::is_floating_point_v<value_type>, "r1::View::matrix: needs float or double; convert() storage types first");
    R1_CHECK(rank() >= 1, "[View.matrix] on a rank-0 view");
    const int64_t cols = shape_[rank() - 1];
    R1_CHECK(cols <= 1 || strides_[rank() - 1] == 1, "[View.matrix] last dim of shape ", shape_, " is strided");
    // The rows step by the stride of the innermost leading dim longer than 1; each longer
    // leading dim further out must step over exactly the dims inside it. Dims of size 1
    // take no steps, so their strides do not matter.
    int64_t rows = 1, row_stride = std::max<int64_t>(cols, 1);
    int inner = -1;
    for (int d = rank() - 2; d >= 0; --d) {
      rows *= shape_[d];
      if (shape_[d] <= 1) continue;
      if (inner < 0) {
        row_stride = strides_[d];
      } else {
        Shape strides;  // printed like a shape
        strides.dims = strides_;
        strides.rank = rank();
        R1_CHECK(strides_[d] == strides_[inner] * shape_[inner], "[View.matrix] leading dims of shape ", shape_,
                 " with strides ", strides, " cannot be flattened into rows");
      }
      inner = d;
    }
    return MatrixMap<T>(data_, rows, cols, Eigen::OuterStride<>(row_stride));
  }

  VectorMap<T> vector() const {
    static_assert(std::is_same_v<Dev, Cpu>, "r1::View::vector: Eigen maps are host-only");
    static_assert(std::is_floating_point_v<value_type>, "r1::View::vector: needs float or double; convert() storage types first");
    R1_CHECK(is_contiguous(), "[View.vector] view of shape ", shape_, " is not contiguous");
    return VectorMap<T>(data_, numel());
  }

 private:
  T* data_ = nullptr;
  Shape shape_{0};
  Strides strides_{1};
};

// Functions take views through these aliases, which stop template deduction at the view:
// T and Dev are deduced from the params and cache, and a Tensor, a View<T> or a
// View<const T> converts at the call site.
template <class T, class Dev = Cpu>
using ConstView = std::type_identity_t<View<const T, Dev>>;
template <class T, class Dev = Cpu>
using MutableView = std::type_identity_t<View<T, Dev>>;

// ---------------------------------------------------------------------------------------
template <class T, class Dev = Cpu>
class Tensor {
 public:
  using value_type = T;

  Tensor() = default;
  // Zero-filled, like torch.zeros.
  explicit Tensor(Shape shape) { resize(shape, /*zero=*/true); }
  Tensor(const Tensor& other) { *this = other; }
  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor& operator=(const Tensor& other) {
    if (this != &other) {
      resize(other.shape_);
      Memory<Dev>::copy(data(), other.data(), bytes());
    }
    return *this;
  }

  // New shape; the contents are unspecified unless zero is set. The buffer is reused when
  // it is large enough, so a tensor resized to the same shape every step never allocates.
  // A resized tensor always has a buffer, even for zero elements: caches use a non-null
  // data() to tell that forward ran.
  void resize(Shape shape, bool zero = false) {
    const int64_t n = shape.numel();
    if (n > capacity_ || !storage_) {
      storage_.reset(static_cast<T*>(Memory<Dev>::allocate(static_cast<std::size_t>(n) * sizeof(T))));
      capacity_ = n;
    }
    shape_ = shape;
    if (zero) set_zero();
  }
  void set_zero() { Memory<Dev>::zero(data(), bytes()); }

  T* data() { return storage_.get(); }
  const T* data() const { return storage_.get(); }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank; }
  int64_t size(int dim) const { return shape_[dim]; }
  int64_t numel() const { return shape_.numel(); }
  bool empty() const { return numel() == 0; }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * sizeof(T); }

  View<T, Dev> view() { return View<T, Dev>(data(), shape_); }
  View<const T, Dev> view() const { return View<const T, Dev>(data(), shape_); }
  operator View<T, Dev>() { return view(); }
  operator View<const T, Dev>() const { return view(); }

  template <class... Index>
  T& operator()(Index... index) { return view()(index...); }
  template <class... Index>
  const T& operator()(Index... index) const { return view()(index...); }

  MatrixMap<T> matrix() { return view().matrix(); }
  MatrixMap<const T> matrix() const { return view().matrix(); }
  VectorMap<T> vector() { return view().vector(); }
  VectorMap<const T> vector() const { return view().vector(); }

 private:
  struct Free {
    void operator()(T* p) const { Memory<Dev>::deallocate(p); }
  };
  std::unique_ptr<T[], Free> storage_;
  int64_t capacity_ = 0;
  Shape shape_{0};  // empty, not a scalar: a default Tensor has no storage
};

// Copies src into dst, element for element; shapes must match. Strided float/double views
// are fine. r1/cuda/tensor.cuh adds the host <-> device and device-to-device overloads, so
// device-generic code writes copy(x, cache.x.view()) for any Dev.
template <class T>
void copy(ConstView<T, Cpu> src, View<T, Cpu> dst) {
  R1_CHECK(src.shape() == dst.shape(), "[copy] src has shape ", src.shape(), ", dst has ", dst.shape());
  if (src.is_contiguous() && dst.is_contiguous()) {
    Memory<Cpu>::copy(dst.data(), src.data(), static_cast<std::size_t>(src.numel()) * sizeof(T));
  } else if constexpr (std::is_floating_point_v<T>) {
    dst.matrix() = src.matrix();
  } else {
    R1_CHECK(false, "[copy] strided views of ", typeid(T).name(), " need contiguous storage");
  }
}

// A tensor holding a copy of a view's elements (strided views are gathered).
template <class T>
Tensor<std::remove_const_t<T>> to_tensor(View<T> v) {
  Tensor<std::remove_const_t<T>> out;
  out.resize(v.shape());
  if (v.is_contiguous()) {
    std::copy(v.data(), v.data() + v.numel(), out.data());
  } else {
    out.matrix() = v.matrix();
  }
  return out;
}

// Elementwise conversion between element types (float <-> bf16, float -> fp8, ...).
template <class From, class To>
void convert(View<const From> src, View<To> dst) {
  R1_CHECK(src.shape() == dst.shape(), "[convert] src has shape ", src.shape(), ", dst has ", dst.shape());
  R1_CHECK(src.is_contiguous() && dst.is_contiguous(), "[convert] needs contiguous views");
  const int64_t n = src.numel();
  for (int64_t i = 0; i < n; ++i) dst.data()[i] = convert_scalar<To>(src.data()[i]);
}

// "[op] name has shape [..], expected [..]" unless the shapes match.
template <class T, class Dev>
void check_shape(const View<T, Dev>& v, const Shape& expected, const char* op, const char* name) {
  R1_CHECK(v.shape() == expected, "[", op, "] ", name, " has shape ", v.shape(), ", expected ", expected);
}

// ---------------------------------------------------------------------------------------
// Random numbers: xoshiro256** (Blackman and Vigna) seeded through splitmix64.
class Rng {
 public:
  explicit Rng(uint64_t seed = 0) {
    for (uint64_t& word : state_) word = splitmix64(seed);
  }

  uint64_t next_u64() {
    const uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  // The whole generator state, for checkpoints: restore(state()) continues the same stream.
  struct State {
    std::array<uint64_t, 4> words{};
    double spare = 0.0;
    bool has_spare = false;
  };
  State state() const { return State{state_, spare_, has_spare_}; }
  void restore(const State& s) {
    state_ = s.words;
    spare_ = s.spare;
    has_spare_ = s.has_spare;
  }

  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

  // Standard normal by Marsaglia's polar method, using portable_log below, so the stream
  // is the same on every IEEE-754 platform.
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u, v, s;
    do {
      u = 2.0 * uniform() - 1.0;
      v = 2.0 * uniform() - 1.0;
      s = std::fma(u, u, v * v);
    } while (s >= 1.0 || s == 0.0);
    const double scale = std::sqrt(-2.0 * portable_log(s) / s);
    spare_ = v * scale;
    has_spare_ = true;
    return u * scale;
  }

  // log(x) for x > 0, within a few ulp, from frexp, std::fma and a fixed series: std::log
  // may differ in the last bit between C libraries, which would break reproducibility.
  static double portable_log(double x) {
    int exponent = 0;
    double m = std::frexp(x, &exponent);  // x = m * 2^exponent, m in [0.5, 1)
    if (m < 0.70710678118654752440) {
      m *= 2.0;
      exponent -= 1;
    }
    // log(m) = 2 atanh(z), z = (m-1)/(m+1), |z| < 0.1716: the odd series converges as z^2 < 0.03.
    const double z = (m - 1.0) / (m + 1.0);
    const double z2 = z * z;
    double series = 1.0 / 25.0;
    for (int k = 23; k >= 1; k -= 2) series = std::fma(series, z2, 1.0 / k);
    constexpr double ln2 = 0.69314718055994530942;
    return std::fma(static_cast<double>(exponent), ln2, 2.0 * z * series);
  }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static uint64_t splitmix64(uint64_t& x) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  std::array<uint64_t, 4> state_{};
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// Fills run on one thread in element order: the result depends only on the seed and the
// number of elements drawn, never on the thread count.
template <class T, class Draw>
void fill_with(View<T> v, Draw&& draw) {
  R1_CHECK(v.is_contiguous(), "[fill] view of shape ", v.shape(), " is not contiguous");
  for (int64_t i = 0; i < v.numel(); ++i) v.data()[i] = convert_scalar<T>(draw());
}

template <class T>
void fill_uniform(View<T> v, Rng& rng, double low = 0.0, double high = 1.0) {
  R1_CHECK(low <= high, "[fill_uniform] low ", low, " > high ", high);
  fill_with(v, [&] { return std::fma(high - low, rng.uniform(), low); });
}

template <class T>
void fill_normal(View<T> v, Rng& rng, double mean = 0.0, double std = 1.0) {
  R1_CHECK(std >= 0.0, "[fill_normal] std ", std, " is negative");
  fill_with(v, [&] { return std::fma(std, rng.normal(), mean); });
}

// Normal(mean, std) resampled until it lies in [low, high], as torch.nn.init.trunc_normal_
// (whose low/high are absolute values, default -2 and 2).
template <class T>
void fill_truncated_normal(View<T> v, Rng& rng, double mean = 0.0, double std = 1.0, double low = -2.0,
                           double high = 2.0) {
  R1_CHECK(std > 0.0, "[fill_truncated_normal] std ", std, " must be positive");
  R1_CHECK(low < high, "[fill_truncated_normal] empty range [", low, ", ", high, "]");
  R1_CHECK((high - mean) / std > -6.0 && (low - mean) / std < 6.0, "[fill_truncated_normal] range [", low, ", ", high,
           "] is more than 6 std from mean ", mean, ": rejection sampling would not terminate");
  fill_with(v, [&] {
    for (;;) {
      const double x = std::fma(std, rng.normal(), mean);
      if (x >= low && x <= high) return x;
    }
  });
}

// ---------------------------------------------------------------------------------------
// Params structs (Linear, RMSNorm, ...) list their tensors through a member
// `template <class F> void visit(F&& f)` that calls f(name, tensor) with HF-style names.
// Gradients, checkpoints and optimizers all walk params through it.

// Calls f(prefix + name, tensor) for each tensor of child: nests HF names ("mlp.gate_proj.weight").
template <class Child, class F>
void visit_prefixed(const std::string& prefix, Child& child, F&& f) {
  child.visit([&](const std::string& name, auto& tensor) { f(prefix + name, tensor); });
}

// Same structure and shapes as params, all zeros: the gradient accumulator for backward.
template <class Params>
Params zeros_like(const Params& params) {
  Params grads = params;
  grads.visit([](const std::string&, auto& tensor) { tensor.set_zero(); });
  return grads;
}

}  // namespace r1
