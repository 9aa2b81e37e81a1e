// The whole consumer program: r1's headers, its dependencies and its target's usage
// requirements all have to arrive for this to compile, link and exit 0. A failed
// R1_CHECK throws r1::error, which ends the program with a non-zero status.
#include <r1/r1.hpp>

int main() {
  r1::Tensor<float> t(r1::Shape{2, 3});
  t.matrix().setConstant(2.0f);
  R1_CHECK(t.matrix().sum() == 12.0f, "[consumer] sum is ", t.matrix().sum(), ", expected 12");
  R1_CHECK(R1_VERSION_MAJOR == 0, "[consumer] R1_VERSION_MAJOR is ", R1_VERSION_MAJOR);
  r1::set_num_threads(2);  // the thread pool links (Threads::Threads travels with r1::r1)
  r1::parallel_for(4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) t.data()[i] += 1.0f;
  }, 1);
  R1_CHECK(t.matrix().sum() == 16.0f, "[consumer] after parallel_for the sum is ", t.matrix().sum(), ", expected 16");
  return 0;
}
