// Test for R1_NO_EXCEPTIONS (r1/config.hpp): built with -fno-exceptions, a failed R1_CHECK
// calls the installed handler with the message. The handler ends the process here
// because, without exceptions, there is no way back into the failed operation.
#include <r1/r1.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>

int main() {
  r1::set_error_handler([](const char* message) {
    const bool expected = std::strstr(message, "[View.slice] range [0, 9) out of bounds for dim 1 of shape [2, 3]") != nullptr;
    std::printf("handler called with: %s\n", message);
    std::fflush(stdout);
    std::_Exit(expected ? EXIT_SUCCESS : 2);
  });
  r1::Tensor<float> t(r1::Shape{2, 3});
  R1_CHECK(t.numel() == 6, "[test] numel is ", t.numel());  // passes: no handler call
  t.view().slice(1, 0, 9);
  std::printf("FAILED: the check did not reach the handler\n");
  return 1;
}
