// The main of every CUDA test binary (test_cuda_*.cu). Without a usable GPU it prints why
// and exits with 77, which CTest's SKIP_RETURN_CODE counts as skipped, not passed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdio>

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device to run on (cudaGetDeviceCount: %s, %d devices)\n",
                status == cudaSuccess ? "ok" : cudaGetErrorString(status), devices);
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
