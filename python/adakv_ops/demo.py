"""A short end-to-end demo: evict a random prompt's KV cache, then decode a few tokens.

Run with ``python -m adakv_ops.demo`` (CPU by default, ``--device cuda`` on a GPU).
"""

from __future__ import annotations

import argparse

import torch

import adakv_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt", type=int, default=2048, help="prompt length N")
    parser.add_argument("--budget", type=int, default=128, help="average kept tokens per KV head")
    parser.add_argument("--steps", type=int, default=8, help="decode steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), torch.float32
    B, Hq, Hk, D, W, N = 2, 8, 2, 64, 32, args.prompt
    # A toy attention pattern: a few "important" keys per head that the window attends to.
    key = torch.randn(B, Hk, N, D, device=dev, dtype=dtype)
    value = torch.randn(B, Hk, N, D, device=dev, dtype=dtype)
    q_window = torch.randn(B, Hq, W, D, device=dev, dtype=dtype)
    hot = torch.randint(0, N - W, (B, Hk, 16), device=dev)
    for b in range(B):
        for h in range(Hk):
            key[b, h, hot[b, h]] = 0.6 * q_window[b, h * (Hq // Hk)].mean(0)
    key_start = torch.tensor([0, N // 4], dtype=torch.int32, device=dev)  # row 1 left-padded

    k_flat, v_flat, seg_start, seg_len = adakv_ops.evict(
        q_window, key, value, budget=args.budget, reserve=args.steps, key_start=key_start)
    full_bytes = 2 * key.numel() * key.element_size()
    flat_bytes = 2 * k_flat.numel() * k_flat.element_size()
    print(f"prompt {N} tokens, budget {args.budget}/head, window {W}, batch {B} (row 1 padded)")
    print(f"tokens kept per KV head: {seg_len.view(B, Hk).tolist()}")
    print(f"KV bytes: full {full_bytes / 2**20:.1f} MiB -> flat {flat_bytes / 2**20:.2f} MiB "
          f"({100 * flat_bytes / full_bytes:.1f}%)")

    for step in range(args.steps):
        k_new = torch.randn(B, Hk, 1, D, device=dev, dtype=dtype)
        v_new = torch.randn(B, Hk, 1, D, device=dev, dtype=dtype)
        adakv_ops.append_(k_flat, v_flat, seg_start, seg_len, k_new, v_new)
        query = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
        out = adakv_ops.decode_attention(query, k_flat, v_flat, seg_start, seg_len)
    print(f"after {args.steps} decode steps: lengths {seg_len.view(B, Hk).tolist()}, "
          f"output {tuple(out.shape)}, |out| = {out.norm():.3f}")


if __name__ == "__main__":
    main()
