// r1/device.hpp: device tags and the dispatch pattern every component follows.
//
// A device is an empty tag type: r1::Cpu or r1::Cuda. Tensors and params carry the tag
// as a template argument, and each component keeps its kernels in a struct template
// specialized on the tag:
//
//   R1_DECLARE_IMPL(LinearImpl, "linear.cuh");      // primary template: static_assert
//   template <> struct LinearImpl<Cpu> { ... };       // in r1/linear.hpp, uses Eigen
//   template <> struct LinearImpl<Cuda> { ... };      // in r1/cuda/linear.cuh
//
// The public functions (r1::forward, r1::backward, ...) call LinearImpl<Dev>::..., so
// using a device whose specialization was not included fails at compile time with a
// message that names the header to include. The choice costs nothing at run time.
#pragma once

#include "config.hpp"

#include <type_traits>

namespace r1 {

struct Cpu {
  static constexpr const char* name = "cpu";
};

struct Cuda {
  static constexpr const char* name = "cuda";
};

template <class Dev>
inline constexpr bool is_device_v = std::is_same_v<Dev, Cpu> || std::is_same_v<Dev, Cuda>;

// False, but only once Dev is known, so a static_assert on it fires only on instantiation.
template <class...>
inline constexpr bool dependent_false_v = false;

}  // namespace r1

// Declares the primary template of a component's implementation struct. It compiles only
// when nobody instantiates it, which is exactly when every device in use has its
// specialization included.
#define R1_DECLARE_IMPL(Impl, cuda_header)                                                 \
  template <class Dev>                                                                     \
  struct Impl {                                                                            \
    static_assert(::r1::is_device_v<Dev>, "r1: " #Impl " is instantiated with a type "     \
                                          "that is not a device tag (r1::Cpu, r1::Cuda)"); \
    static_assert(::r1::dependent_false_v<Dev>,                                            \
                  "r1: " #Impl " has no specialization for this device. For r1::Cuda, "    \
                  "include <r1/cuda/" cuda_header "> in a .cu file compiled by nvcc with " \
                  "-DR1_ENABLE_CUDA=ON.");                                                 \
  }
