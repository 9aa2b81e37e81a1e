// r1/config.hpp: version, the library's one __CUDACC__ switch, and error checking.
//
// Everything else in r1 includes this header first. It decides three things:
//   - R1_HOST_DEVICE: functions marked with it compile for host and device under nvcc
//     and are plain `inline` under a host compiler. No other header tests __CUDACC__.
//   - R1_CHECK(cond, parts...): throws r1::error with an op-prefixed message built from
//     the parts, e.g. R1_CHECK(n > 0, "[linear.forward] x has ", n, " rows").
//   - R1_NO_EXCEPTIONS: for builds without exceptions. A failed check then calls the
//     handler installed with r1::set_error_handler, or std::abort() when none is set,
//     because without exceptions there is no way back to the caller (nlohmann/json's
//     JSON_NOEXCEPTION makes the same choice).
#pragma once

#include <fmt/format.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#define R1_VERSION_MAJOR 0
#define R1_VERSION_MINOR 1
#define R1_VERSION_PATCH 0
#define R1_VERSION_STRING "0.1.0"

#if defined(__CUDACC__)
#define R1_HOST_DEVICE __host__ __device__ __forceinline__
#define R1_CUDA_COMPILER 1
#else
#define R1_HOST_DEVICE inline
#define R1_CUDA_COMPILER 0
#endif

// CUDA kernels are only compiled when the build asked for them (R1_WITH_CUDA, set by
// -DR1_ENABLE_CUDA=ON) and the translation unit is compiled by nvcc.
#if defined(R1_WITH_CUDA) && R1_CUDA_COMPILER
#define R1_CUDA_ENABLED 1
#else
#define R1_CUDA_ENABLED 0
#endif

namespace r1 {

// Every failure r1 reports: bad shapes, out-of-range ids, invalid configs, malformed files.
struct error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using error_handler = void (*)(const char* message);

namespace detail {

inline error_handler& installed_error_handler() {
  static error_handler handler = nullptr;
  return handler;
}

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::string out;
  (fmt::format_to(std::back_inserter(out), "{}", parts), ...);
  return out;
}

[[noreturn]] inline void fail(const std::string& message) {
#if defined(R1_NO_EXCEPTIONS)
  if (error_handler handler = installed_error_handler()) handler(message.c_str());
  std::abort();
#else
  throw error(message);
#endif
}

}  // namespace detail

// Only consulted when compiled with R1_NO_EXCEPTIONS; returns the previous handler.
inline error_handler set_error_handler(error_handler handler) {
  error_handler previous = detail::installed_error_handler();
  detail::installed_error_handler() = handler;
  return previous;
}

}  // namespace r1

#define R1_CHECK(cond, ...)                                    \
  do {                                                         \
    if (!(cond)) ::r1::detail::fail(::r1::detail::concat(__VA_ARGS__)); \
  } while (0)

// Debug-only check for hot loops; compiled out unless R1_DEBUG is defined.
#if defined(R1_DEBUG)
#define R1_ASSERT(cond, ...) R1_CHECK(cond, __VA_ARGS__)
#else
#define R1_ASSERT(cond, ...) ((void)0)
#endif
