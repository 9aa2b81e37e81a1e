// quickstart: the README's 20-line sample, built with the examples so it stays correct.
#include <r1/r1.hpp>

int main() {
  r1::Rng rng(0);
  r1::Mlp<float> mlp(/*dim=*/64, /*hidden=*/256);            // SwiGLU: w2(silu(w1 x) * w3 x)
  mlp.visit([&](const std::string&, r1::Tensor<float>& w) { r1::fill_normal(w.view(), rng, 0.0, 0.02); });
  r1::Mlp<float> grads = r1::zeros_like(mlp);

  r1::ParameterRegistry<float> params;                        // HF names: "mlp.gate_proj.weight", ...
  params.add("mlp.", mlp, grads);
  r1::AdamW<float> adamw(params, {.lr = 1e-3, .weight_decay = 0.1});

  r1::Tensor<float> x(r1::Shape{8, 16, 64}), target(r1::Shape{8, 16, 64});   // [B, S, D]
  r1::fill_normal(x.view(), rng);
  r1::MlpCache<float> cache;                                  // what backward needs, reused every step
  for (int step = 0; step < 100; ++step) {
    const auto& y = r1::forward(mlp, x, cache);
    r1::Tensor<float> dy = y;                                 // d/dy of 0.5 |y - target|^2
    dy.matrix() -= target.matrix();
    params.zero_grad();
    r1::backward(mlp, cache, dy, grads);                      // accumulates into grads (+=)
    r1::clip_grad_norm(params, 1.0);
    adamw.step();
  }
}
