"""The libtorch peer for bench_mla's training case: a straightforward MLA layer in PyTorch.

Written from the DeepSeek-V2/V3 equations the way HF's DeepseekV3Attention runs them
(naive path: per-head K and V are materialized, then a masked softmax attention):

    q = wq_b(q_norm(wq_a(x)))            [B, S, H, nope + rope]
    kv_a = wkv_a(x) = [c_kv | k_pe]      c_kv: kv_lora, k_pe: one RoPE head shared by all heads
    k_nope, v = split(wkv_b(kv_norm(c_kv)))
    q_pe, k_pe = rope(q_pe), rope(k_pe)
    o = softmax(q k^T * scale + causal mask) v,  y = wo(o)

Autograd does the backward. torch 1.13 (Debian) has no fused attention, so this is what
a PyTorch user on this machine runs. It prints JSON lines like bench_mla:

    env -u OPENBLAS_CORETYPE /usr/bin/python3 bench/peer_mla_torch.py --threads 1,2

"At its best": float32, OpenBLAS with its autodetected kernels (the environment's
OPENBLAS_CORETYPE must be unset before Python starts, hence env -u), the same warmed-up
tensors every call, and the best of several timed repeats.
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, cos, sin):
    # Interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's inference/model.py rotates them.
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def mla_forward(x, w, a, cos, sin, mask):
    B, S, _ = x.shape
    H, N, R, V = a.heads, a.nope, a.rope, a.v
    q = F.linear(rms_norm(F.linear(x, w["wq_a"]), w["q_norm"]), w["wq_b"]).view(B, S, H, N + R)
    q_nope, q_pe = q.split([N, R], dim=-1)
    kv_a = F.linear(x, w["wkv_a"])
    c_kv, k_pe = kv_a.split([a.kv_lora, R], dim=-1)
    kv = F.linear(rms_norm(c_kv, w["kv_norm"]), w["wkv_b"]).view(B, S, H, N + V)
    k_nope, v = kv.split([N, V], dim=-1)
    q_pe = rope(q_pe, cos[:, None, :], sin[:, None, :])
    k_pe = rope(k_pe, cos, sin)[:, :, None, :].expand(B, S, H, R)
    q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
    k = torch.cat((k_nope, k_pe), dim=-1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * (N + R) ** -0.5 + mask
    o = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, S, H * V)
    return F.linear(o, w["wo"])


def best_seconds(fn, budget=2.0, min_repeats=3):
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
    for name, default in [("dim", 512), ("heads", 8), ("q_lora", 192), ("kv_lora", 128), ("nope", 32), ("rope", 16),
                          ("v", 32), ("batch", 4), ("seq", 512)]:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=default)
    parser.add_argument("--threads", default="1,2")
    a = parser.parse_args()
    torch.manual_seed(0)
    H, N, R, V = a.heads, a.nope, a.rope, a.v
    param = lambda *shape: (torch.randn(*shape) / math.sqrt(shape[-1])).requires_grad_()
    w = {"wq_a": param(a.q_lora, a.dim), "q_norm": torch.ones(a.q_lora, requires_grad=True),
         "wq_b": param(H * (N + R), a.q_lora), "wkv_a": param(a.kv_lora + R, a.dim),
         "kv_norm": torch.ones(a.kv_lora, requires_grad=True), "wkv_b": param(H * (N + V), a.kv_lora),
         "wo": param(a.dim, H * V)}
    positions = torch.arange(a.seq, dtype=torch.float32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    mask = torch.full((a.seq, a.seq), float("-inf")).triu(1)
    x = torch.randn(a.batch, a.seq, a.dim).requires_grad_()
    dy = torch.randn(a.batch, a.seq, a.dim)

    def forward_backward():
        mla_forward(x, w, a, cos, sin, mask).backward(dy)

    shape = {"dim": a.dim, "heads": H, "q_lora": a.q_lora, "kv_lora": a.kv_lora, "nope": N, "rope": R, "v": V,
             "batch": a.batch, "seq": a.seq}
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        seconds = best_seconds(forward_backward)
        print(json.dumps({"name": "torch_mla_train", "shape": shape, "threads": threads,
                          "tokens_per_s": round(a.batch * a.seq / seconds, 1), "best_ms": round(seconds * 1e3, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
