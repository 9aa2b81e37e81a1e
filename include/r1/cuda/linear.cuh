// r1/cuda/linear.cuh: dense GEMMs through cuBLASLt, and LinearImpl<Cuda>.
//
//   cuda_gemm:  C[M,N] = alpha op(A)[M,K] op(B)[K,N] (+ C with accumulate), row-major views
//   forward:    y[M,N]  = x[M,K] W[N,K]^T + b[N]
//   backward:   dx[M,K] = dy[M,N] W[N,K],  dW[N,K] += dy^T x,  db[N] += column sums of dy
//
// Legend: M rows (leading dims flattened), K inner dim (in_features), N columns
// (out_features). T is float or r1::bf16 (the bit layout of __nv_bfloat16): the products
// accumulate in fp32 (CUBLAS_COMPUTE_32F, never TF32) and write T.
//
// Row-major onto cuBLASLt's column-major: a row-major matrix [R, C] with row stride ld is,
// read column-major, its transpose [C, R] with the same ld. So cuda_gemm asks cuBLASLt for
// C^T = op(B)^T op(A)^T: B goes in cuBLASLt's A slot and A in its B slot, each described by
// its stored shape swapped, and each op() flag passes through unchanged (transposing the
// stored [N, K] weight is CUBLAS_OP_T on the [K, N] column-major view of it).
//
// cuBLASLt needs a handle, a workspace and a plan (descriptors and the heuristic's first
// algorithm) per problem. Each host thread keeps its own handle and a plan cache keyed by
// dtype, flags, sizes, strides and pointer alignments; each (thread, stream) pair keeps its
// own workspace and reduction scratch, so matmuls on two streams never share a workspace.
//
// Also here, because norm.cuh, mlp.cuh and optim.cuh reuse them: device load/store of T in
// fp32 (dense_detail::load, store), a deterministic block sum, and a deterministic column
// sum (per-block partials into scratch, then one ordered pass per column; no atomics).
#pragma once

#include "tensor.cuh"
#include "../linear.hpp"

#include <cublasLt.h>
#include <cuda_bf16.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <type_traits>
#include <unordered_map>

// Turns a cuBLAS status into an r1::error naming the call and the status.
#define R1_CUBLAS_CHECK(call, op)                                                                         \
  do {                                                                                                    \
    const cublasStatus_t r1_cublas_status = (call);                                                       \
    R1_CHECK(r1_cublas_status == CUBLAS_STATUS_SUCCESS, "[", op, "] ", #call, " failed: ",                \
             cublasLtGetStatusName(r1_cublas_status), " (", cublasLtGetStatusString(r1_cublas_status), ")"); \
  } while (0)

namespace r1 {

namespace dense_detail {

// ---------------------------------------------------------------------------------------
// Elements in fp32 on the device.
template <class T>
inline constexpr bool is_dense_type_v = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

static_assert(sizeof(bf16) == sizeof(__nv_bfloat16), "r1::bf16 must have __nv_bfloat16's layout");

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(bf16 x) { return __uint_as_float(static_cast<uint32_t>(x.bits) << 16); }

template <class T>
__device__ __forceinline__ T store(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
  }
}

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  static_assert(is_dense_type_v<T>, "r1 cuda dense kernels take float or r1::bf16");
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

// ---------------------------------------------------------------------------------------
// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32
// (at most 1024) and every thread must call it. The order of additions depends only on
// blockDim.x, so the result is the same on every run.
template <class U>
__device__ U block_sum(U v) {
  __shared__ U warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // a previous call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  U total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) total += warp_sums[w];
  return total;
}

// ---------------------------------------------------------------------------------------
// Device buffers of this host thread for the current stream: kernels on one stream run in
// order, so a buffer is never used by two kernels at once. Growing one frees the old
// buffer, and cudaFree waits for the device first.
struct StreamBuffers {
  Tensor<uint8_t, Cuda> gemm_workspace;
  Tensor<uint8_t, Cuda> scratch;
};

inline StreamBuffers& stream_buffers() {
  thread_local std::unordered_map<cudaStream_t, StreamBuffers> buffers;
  return buffers[cuda_stream()];
}

// count elements of U in this stream's scratch; valid until the next call on this stream.
template <class U>
U* scratch(int64_t count) {
  Tensor<uint8_t, Cuda>& buffer = stream_buffers().scratch;
  const int64_t bytes = std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(U));
  if (buffer.numel() < bytes) buffer.resize(Shape{bytes});
  return reinterpret_cast<U*>(buffer.data());
}

// ---------------------------------------------------------------------------------------
// out[c] += sum over r of term(r, c), deterministically. Blocks of 32 columns x 8 row
// lanes each sum a chunk of rows into one fp32 partial per column; a second kernel adds a
// column's partials in chunk order. The chunking depends only on the sizes.
inline constexpr int kColumnTile = 32;
inline constexpr int kRowLanes = 8;
inline constexpr int64_t kMaxRowChunks = 256;

template <class Term>
__global__ void column_partial_sums_kernel(Term term, int64_t rows, int64_t cols, int64_t rows_per_chunk, float* partial) {
  __shared__ float lane_sums[kRowLanes][kColumnTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = min(rows, begin + rows_per_chunk);
  float sum = 0.0f;
  if (col < cols)
    for (int64_t r = begin + threadIdx.y; r < end; r += kRowLanes) sum += term(r, col);
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.0f;
    for (int lane = 0; lane < kRowLanes; ++lane) total += lane_sums[lane][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * cols + col] = total;
  }
}

template <class T>
__global__ void add_column_partials_kernel(const float* partial, int64_t chunks, int64_t cols, T* out) {
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < cols;
       col += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float total = 0.0f;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partial[chunk * cols + col];
    out[col] = store<T>(load(out[col]) + total);
  }
}

// Term: a copyable functor with `__device__ float operator()(int64_t row, int64_t col) const`.
template <class T, class Term>
void add_column_sums(const Term& term, int64_t rows, int64_t cols, T* out, const char* op) {
  if (rows == 0 || cols == 0) return;
  const int64_t rows_per_chunk = std::max<int64_t>(64, (rows + kMaxRowChunks - 1) / kMaxRowChunks);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t column_tiles = (cols + kColumnTile - 1) / kColumnTile;
  R1_CHECK(column_tiles <= 0x7fffffff, "[", op, "] ", cols, " columns are too many for one grid");
  float* partial = scratch<float>(chunks * cols);
  const dim3 grid(static_cast<unsigned>(column_tiles), static_cast<unsigned>(chunks));
  column_partial_sums_kernel<<<grid, dim3(kColumnTile, kRowLanes), 0, cuda_stream()>>>(term, rows, cols, rows_per_chunk,
                                                                                      partial);
  R1_CUDA_CHECK_LAUNCH(op);
  add_column_partials_kernel<<<cuda_blocks(cols), 256, 0, cuda_stream()>>>(partial, chunks, cols, out);
  R1_CUDA_CHECK_LAUNCH(op);
}

// ---------------------------------------------------------------------------------------
// A view as a row-major matrix: leading dims flattened into rows, the last dim contiguous.
// Rank 2 views may have a row stride (column slices); higher ranks must be contiguous.
struct DeviceMatrix {
  const void* data;
  int64_t rows, cols, ld;
};

template <class T>
DeviceMatrix device_matrix(const View<const T, Cuda>& v, const char* op, const char* name) {
  R1_CHECK(v.rank() >= 1, "[", op, "] ", name, " is a rank-0 view");
  const int64_t cols = v.size(v.rank() - 1);
  int64_t rows = 1;
  for (int d = 0; d + 1 < v.rank(); ++d) rows *= v.size(d);
  int64_t ld = std::max<int64_t>(cols, 1);
  if (v.rank() == 2 && rows > 1) {
    ld = v.strides()[0];
  } else if (v.rank() > 2) {
    R1_CHECK(v.is_contiguous(), "[", op, "] ", name, " of shape ", v.shape(), " must be contiguous (rank > 2)");
  }
  R1_CHECK(cols <= 1 || v.strides()[v.rank() - 1] == 1, "[", op, "] ", name, " of shape ", v.shape(),
           " has a strided last dim");
  R1_CHECK(ld >= cols, "[", op, "] ", name, " of shape ", v.shape(), " has row stride ", ld, " < ", cols, " columns");
  return DeviceMatrix{v.data(), rows, cols, ld};
}

// ---------------------------------------------------------------------------------------
// cuBLASLt: the thread's handle and cached plans.
inline constexpr std::size_t kGemmWorkspaceBytes = 32u << 20;  // NVIDIA's advice for Hopper

struct GemmPlan {
  cublasLtMatmulDesc_t matmul = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // cuBLASLt's slots
  cublasLtMatmulAlgo_t algo{};
  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {  // no throw from a destructor path
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (matmul) cublasLtMatmulDescDestroy(matmul);
  }
};

// What picks a plan: dtype, op flags, accumulate, m, n, k, the three lds and the three
// pointer alignments (cuBLASLt's heuristic picks kernels for the alignment it is told).
using GemmKey = std::array<int64_t, 13>;

class CublasLt {
 public:
  CublasLt() { R1_CUBLAS_CHECK(cublasLtCreate(&handle_), "cuda_gemm"); }
  ~CublasLt() {
    plans_.clear();
    cublasLtDestroy(handle_);
  }
  CublasLt(const CublasLt&) = delete;
  CublasLt& operator=(const CublasLt&) = delete;

  cublasLtHandle_t handle() const { return handle_; }
  std::map<GemmKey, std::unique_ptr<GemmPlan>>& plans() { return plans_; }

 private:
  cublasLtHandle_t handle_ = nullptr;
  std::map<GemmKey, std::unique_ptr<GemmPlan>> plans_;
};

inline CublasLt& cublaslt() {
  thread_local CublasLt instance;
  return instance;
}

// Largest power of two (up to 256) dividing the address.
inline uint32_t pointer_alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment >>= 1;
  return alignment;
}

template <class T>
const GemmPlan& gemm_plan(const DeviceMatrix& a, bool transpose_a, const DeviceMatrix& b, bool transpose_b,
                          const DeviceMatrix& c, bool accumulate, int64_t inner) {
  const uint32_t align_a = pointer_alignment(a.data), align_b = pointer_alignment(b.data),
                 align_c = pointer_alignment(c.data);
  const GemmKey key{static_cast<int64_t>(cuda_data_type<T>()), transpose_a, transpose_b, accumulate, c.rows, c.cols, inner,
                    a.ld, b.ld, c.ld, align_a, align_b, align_c};
  CublasLt& lt = cublaslt();
  auto found = lt.plans().find(key);
  if (found != lt.plans().end()) return *found->second;

  auto plan = std::make_unique<GemmPlan>();
  constexpr cudaDataType_t type = cuda_data_type<T>();
  R1_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->matmul, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cuda_gemm");
  // cuBLASLt's A slot holds our B and its B slot our A (see the top of this file).
  const cublasOperation_t op_slot_a = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_slot_b = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  R1_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->matmul, CUBLASLT_MATMUL_DESC_TRANSA, &op_slot_a, sizeof(op_slot_a)),
                  "cuda_gemm");
  R1_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->matmul, CUBLASLT_MATMUL_DESC_TRANSB, &op_slot_b, sizeof(op_slot_b)),
                  "cuda_gemm");
  // A stored row-major [rows, cols] is column-major [cols, rows] with the same ld.
  R1_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, type, b.cols, b.rows, b.ld), "cuda_gemm");
  R1_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, type, a.cols, a.rows, a.ld), "cuda_gemm");
  R1_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, type, c.cols, c.rows, c.ld), "cuda_gemm");

  cublasLtMatmulPreference_t preference = nullptr;
  R1_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference), "cuda_gemm");
  const uint64_t workspace_bytes = kGemmWorkspaceBytes;
  const uint32_t align_slot_a = align_b, align_slot_b = align_a;
  cublasLtMatmulHeuristicResult_t result{};
  int found_algos = 0;
  const cublasStatus_t status = [&] {
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                            &workspace_bytes, sizeof(workspace_bytes));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_slot_a,
                                               sizeof(align_slot_a));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_slot_b,
                                               sizeof(align_slot_b));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                               sizeof(align_c));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                               sizeof(align_c));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulAlgoGetHeuristic(lt.handle(), plan->matmul, plan->a, plan->b, plan->c, plan->c, preference, 1,
                                         &result, &found_algos);
    return s;
  }();
  cublasLtMatmulPreferenceDestroy(preference);
  R1_CUBLAS_CHECK(status, "cuda_gemm");
  R1_CHECK(found_algos > 0, "[cuda_gemm] cuBLASLt has no algorithm for ", c.rows, "x", inner, " by ", inner, "x", c.cols,
           " (transpose_a ", transpose_a, ", transpose_b ", transpose_b, ", lds ", a.ld, ", ", b.ld, ", ", c.ld, ")");
  plan->algo = result.algo;
  return *lt.plans().emplace(key, std::move(plan)).first->second;
}

}  // namespace dense_detail

// ---------------------------------------------------------------------------------------
// C = alpha op(A) op(B), or C += alpha op(A) op(B) with accumulate, on row-major device
// views (leading dims flattened into rows; rank-2 views may have a row stride). op(A) is
// [M, K]: A is [M, K], or [K, M] with transpose_a. op(B) is [K, N]: B is [K, N], or [N, K]
// with transpose_b. Runs asynchronously on cuda_stream().
struct CudaGemmOptions {
  bool transpose_a = false;
  bool transpose_b = false;
  float alpha = 1.0f;
  bool accumulate = false;
};

template <class T>
void cuda_gemm(ConstView<T, Cuda> a, ConstView<T, Cuda> b, MutableView<T, Cuda> c, const CudaGemmOptions& options = {}) {
  static_assert(dense_detail::is_dense_type_v<T>, "r1::cuda_gemm takes float or r1::bf16");
  const dense_detail::DeviceMatrix am = dense_detail::device_matrix<T>(a, "cuda_gemm", "A");
  const dense_detail::DeviceMatrix bm = dense_detail::device_matrix<T>(b, "cuda_gemm", "B");
  const dense_detail::DeviceMatrix cm = dense_detail::device_matrix<T>(c, "cuda_gemm", "C");
  const int64_t m = options.transpose_a ? am.cols : am.rows, k = options.transpose_a ? am.rows : am.cols;
  const int64_t kb = options.transpose_b ? bm.cols : bm.rows, n = options.transpose_b ? bm.rows : bm.cols;
  R1_CHECK(k == kb && cm.rows == m && cm.cols == n, "[cuda_gemm] cannot multiply op(A) ", m, "x", k, " by op(B) ", kb, "x",
           n, " into C ", cm.rows, "x", cm.cols, " (A ", a.shape(), ", B ", b.shape(), ", C ", c.shape(),
           ", transpose_a ", options.transpose_a, ", transpose_b ", options.transpose_b, ")");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: cuBLASLt takes no zero-sized layouts
    if (!options.accumulate)
      R1_CUDA_CHECK(cudaMemset2DAsync(c.data(), cm.ld * sizeof(T), 0, n * sizeof(T), m, cuda_stream()), "cuda_gemm");
    return;
  }
  const dense_detail::GemmPlan& plan =
      dense_detail::gemm_plan<T>(am, options.transpose_a, bm, options.transpose_b, cm, options.accumulate, k);
  Tensor<uint8_t, Cuda>& workspace = dense_detail::stream_buffers().gemm_workspace;
  if (workspace.numel() < static_cast<int64_t>(dense_detail::kGemmWorkspaceBytes))
    workspace.resize(Shape{static_cast<int64_t>(dense_detail::kGemmWorkspaceBytes)});
  const float alpha = options.alpha, beta = options.accumulate ? 1.0f : 0.0f;
  R1_CUBLAS_CHECK(cublasLtMatmul(dense_detail::cublaslt().handle(), plan.matmul, &alpha, b.data(), plan.a, a.data(), plan.b,
                                 &beta, c.data(), plan.c, c.data(), plan.c, &plan.algo, workspace.data(),
                                 dense_detail::kGemmWorkspaceBytes, cuda_stream()),
                  "cuda_gemm");
}

// ---------------------------------------------------------------------------------------
namespace dense_detail {

template <class T>
__global__ void add_bias_kernel(T* y, int64_t rows, int64_t cols, int64_t ld, const T* bias) {
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols, col = i % cols;
    T& out = y[row * ld + col];
    out = store<T>(load(out) + load(bias[col]));
  }
}

// term(r, c) = m[r, c] for a row-major matrix with row stride ld.
template <class T>
struct MatrixElement {
  const T* data;
  int64_t ld;
  __device__ float operator()(int64_t row, int64_t col) const { return load(data[row * ld + col]); }
};

}  // namespace dense_detail

template <>
struct LinearImpl<Cuda> {
  template <class T>
  static void affine(ConstView<T, Cuda> x, const Linear<T, Cuda>& p, MutableView<T, Cuda> y) {
    cuda_gemm<T>(x, p.weight, y, {.transpose_b = true});
    if (!p.has_bias()) return;
    const dense_detail::DeviceMatrix ym = dense_detail::device_matrix<T>(y, "linear.forward", "y");
    if (ym.rows * ym.cols == 0) return;
    dense_detail::add_bias_kernel<<<cuda_blocks(ym.rows * ym.cols), 256, 0, cuda_stream()>>>(
        y.data(), ym.rows, ym.cols, ym.ld, p.bias.data());
    R1_CUDA_CHECK_LAUNCH("linear.forward");
  }

  template <class T>
  static void input_grad(const Linear<T, Cuda>& p, ConstView<T, Cuda> dy, MutableView<T, Cuda> dx, bool accumulate) {
    cuda_gemm<T>(dy, p.weight, dx, {.accumulate = accumulate});
  }

  template <class T>
  static void weight_grad(const Linear<T, Cuda>& p, ConstView<T, Cuda> x, ConstView<T, Cuda> dy, Linear<T, Cuda>& g) {
    cuda_gemm<T>(dy, x, g.weight, {.transpose_a = true, .accumulate = true});
    if (!p.has_bias()) return;
    const dense_detail::DeviceMatrix dym = dense_detail::device_matrix<T>(dy, "linear.backward", "dy");
    dense_detail::add_column_sums(dense_detail::MatrixElement<T>{dy.data(), dym.ld}, dym.rows, dym.cols, g.bias.data(),
                                 "linear.backward");
  }
};

}  // namespace r1
