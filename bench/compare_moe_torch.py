"""r1's MoE layer against the libtorch peer, in alternating rounds on the same cores.

This host's timings drift by 20-30% within minutes (shared/notes/machine.md, trap 3), so
one run of each side proves little. Each round runs bench_moe's moe.fwd_bwd, then the peer
(bench/peer_moe_torch.py) in every torch/OpenBLAS thread split that fits the cores, and
compares r1 with the best split of that round. The peer gets the conditions of "at its
best": OPENBLAS_CORETYPE unset so that OpenBLAS autodetects its kernels, warmed-up tensors,
and the best of its timed repeats.

    /usr/bin/python3 bench/compare_moe_torch.py --bench build/bench/bench_moe --rounds 6 \\
        --threads 2 -- --tokens 512 --dim 512 --experts 16 --hidden 256 --shared 2 --topk 4

Arguments after -- go to both programs: the shape flags they share (--tokens --dim
--experts --hidden --shared --topk; the peer routes greedily, so no --groups). Output: one JSON line
per round ({"name":"compare_moe.round", r1 and peer tokens/s, the peer's best split, ratio})
and a summary line with the median and the smallest ratio, and the ratio of the best r1
figure to the best peer figure of the whole run.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_moe_torch.py")


def fwd_bwd_tokens_per_s(command, env, name):
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("name") == name:
            return record["tokens_per_s"]
    sys.exit(f"compare_moe_torch: {' '.join(command)} printed no {name} line")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", required=True, help="path of the bench_moe executable")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="cores both sides may use")
    parser.add_argument("shape", nargs="*", help="shape flags for both programs, after --")
    a = parser.parse_args()
    if a.rounds < 1 or a.threads < 1:
        sys.exit("compare_moe_torch: --rounds and --threads must be at least 1")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    # Every split that does not oversubscribe the cores (torch x OpenBLAS threads).
    splits = [(t, b) for t in range(1, a.threads + 1) for b in range(1, a.threads + 1) if t * b <= a.threads]
    ratios, r1_best, peer_best = [], 0, 0
    for round_index in range(1, a.rounds + 1):
        r1 = fwd_bwd_tokens_per_s([a.bench, *a.shape, "--threads", str(a.threads)], env, "moe.fwd_bwd")
        peer = {}
        for torch_threads, blas_threads in splits:
            split_env = dict(env, OPENBLAS_NUM_THREADS=str(blas_threads))
            command = [sys.executable, PEER, *a.shape, "--threads", str(torch_threads)]
            peer[f"torch{torch_threads}_blas{blas_threads}"] = fwd_bwd_tokens_per_s(command, split_env, "torch_moe.fwd_bwd")
        best_split = max(peer, key=peer.get)
        ratios.append(r1 / peer[best_split])
        r1_best, peer_best = max(r1_best, r1), max(peer_best, peer[best_split])
        print(json.dumps({"name": "compare_moe.round", "round": round_index, "threads": a.threads,
                          "r1_tokens_per_s": r1, "peer_tokens_per_s": peer, "peer_best_split": best_split,
                          "ratio": round(ratios[-1], 3)}), flush=True)
    print(json.dumps({"name": "compare_moe.summary", "shape": " ".join(a.shape), "threads": a.threads,
                      "rounds": a.rounds, "median_ratio": round(statistics.median(ratios), 3),
                      "min_ratio": round(min(ratios), 3), "best_over_best": round(r1_best / peer_best, 3),
                      "r1_best": r1_best, "peer_best": peer_best}), flush=True)


if __name__ == "__main__":
    main()
