"""The libtorch peer for bench_moe: the usual loop-over-experts DeepSeekMoE layer.

This is how HF's DeepseekV3MoE and DeepSeek's reference inference/model.py run the experts:
for each expert, index the tokens routed to it, run its SwiGLU MLP, scale by the gate
weight and index_add into the output; the shared experts are one MLP over all tokens.
Autograd does the backward. It prints JSON lines in bench_moe's format, so the two can be
compared line by line on the same machine in the same run:

    env -u OPENBLAS_CORETYPE /usr/bin/python3 bench/peer_moe_torch.py --tokens 512 --dim 512 \\
        --experts 16 --hidden 256 --shared 2 --topk 4 --threads 1,2

"At its best": float32, OpenBLAS with its autodetected kernels (the environment's
OPENBLAS_CORETYPE must be unset before Python starts, hence env -u), the same warmed-up
tensors every call, and the best of several timed repeats.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def swiglu(x, w1, w2, w3):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def moe_forward(x, gate, experts, shared, k):
    scores = torch.sigmoid(F.linear(x, gate))
    weight, idx = scores.topk(k, dim=-1)
    weight = weight / (weight.sum(-1, keepdim=True) + 1e-20) * 2.5
    y = torch.zeros_like(x)
    for e, (w1, w2, w3) in enumerate(experts):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        y = y.index_add(0, token, swiglu(x[token], w1, w2, w3) * weight[token, slot, None])
    return y + swiglu(x, *shared)


def best_seconds(fn, budget=1.0, min_repeats=3):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    for name, default in [("tokens", 512), ("dim", 512), ("experts", 16), ("hidden", 256), ("shared", 2), ("topk", 4)]:
        parser.add_argument("--" + name, type=int, default=default)
    parser.add_argument("--threads", default="1,2")
    a = parser.parse_args()
    torch.manual_seed(0)
    param = lambda *shape: (torch.rand(*shape) * 0.1 - 0.05).requires_grad_()
    gate = param(a.experts, a.dim)
    experts = [(param(a.hidden, a.dim), param(a.dim, a.hidden), param(a.hidden, a.dim)) for _ in range(a.experts)]
    width = a.shared * a.hidden
    shared = (param(width, a.dim), param(a.dim, width), param(width, a.dim))
    x = (torch.rand(a.tokens, a.dim) * 2 - 1).requires_grad_()
    dy = torch.rand(a.tokens, a.dim) * 2 - 1
    flops = a.tokens * ((a.topk + a.shared) * 6.0 * a.dim * a.hidden + 2.0 * a.dim * a.experts)

    def forward():
        with torch.no_grad():
            moe_forward(x, gate, experts, shared, a.topk)

    def forward_backward():
        moe_forward(x, gate, experts, shared, a.topk).backward(dy)

    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, fn, passes in [("torch_moe.fwd", forward, 1.0), ("torch_moe.fwd_bwd", forward_backward, 3.0)]:
            seconds = best_seconds(fn)
            print(json.dumps({"name": name, "tokens": a.tokens, "dim": a.dim, "experts": a.experts, "hidden": a.hidden,
                              "shared": a.shared, "topk": a.topk, "threads": threads,
                              "tokens_per_s": round(a.tokens / seconds), "gflops": round(passes * flops / seconds * 1e-9, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
