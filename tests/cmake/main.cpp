// The whole consumer program: r1's headers, its dependencies and its target's usage
// requirements all have to arrive for this to compile, link and return 0.
#include <r1/r1.hpp>

int main() {
  r1::Tensor<float> t(r1::Shape{2, 3});
  t.matrix().setConstant(2.0f);
  return (t.matrix().sum() == 12.0f && R1_VERSION_MAJOR == 0) ? 0 : 1;
}
