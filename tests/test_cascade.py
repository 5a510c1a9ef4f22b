"""adakv_ops.cascade.LayerCascade (Layer-DefensiveKV's bounded global top-k, SPEC 7.3) against
the unbounded fp64 oracle: after the last layer, the rows every layer keeps (its new columns,
re-trimmed as later layers arrive) are exactly the global top-k over all layers, on tie-heavy
scores with NaN, -inf and padding; and the retained rows never exceed the final cache."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import DEVICES, make_key_start, rand_scores, tie_scores

from adakv_ops.cascade import LayerCascade, top_k_mask

rf = importlib.import_module("adakv_ops.reference_followups")


def _run(layer_scores, C, W, ks, device="cpu"):
    """Feed the layers one by one (on ``device``); apply every re-trim to per-segment column
    lists."""
    B, H, L = layer_scores[0].shape
    cas = LayerCascade(len(layer_scores), C)
    kept = []                    # kept[layer][b][h] = ascending prefix columns
    held = []
    for s in layer_scores:
        idx, cnt, retrim = cas.add(s.to(device), None if ks is None else ks.to(device))
        idx, cnt = idx.cpu(), cnt.cpu()
        retrim = [None if k is None else k.cpu() for k in retrim]
        assert len(retrim) == len(kept)
        for j, keep in enumerate(retrim):
            if keep is None:
                continue
            for b in range(B):
                for h in range(H):
                    cols = kept[j][b][h]
                    kept[j][b][h] = [c for p, c in enumerate(cols) if bool(keep[b, h, p])]
        kept.append([[idx[b, h, :int(cnt[b, h])].tolist() for h in range(H)] for b in range(B)])
        held.append(sum(len(c) for lay in kept for row in lay for c in row))
    return kept, held


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_layers", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["ties", "rand", "special"])
def test_cascade_is_the_global_top_k(n_layers, kind, device):
    W = 3
    for seed in range(6):
        B, H, L, C = 3, 1 + seed % 3, 7 + 5 * seed, seed % 4 + 1
        ks = make_key_start(B, L, seed) if seed % 2 else None
        layers = []
        for layer in range(n_layers):
            sd = 1000 * seed + layer
            s = (tie_scores(B, H, L, sd, key_start=ks) if kind != "rand"
                 else rand_scores(B, H, L, sd, key_start=ks))
            if kind == "special":
                g = torch.Generator().manual_seed(sd)
                m = torch.rand(s.shape, generator=g)
                s = torch.where(m < 0.1, torch.tensor(float("nan")), s)
                s = torch.where((m > 0.9) & (s > -1), torch.tensor(float("-inf")), s)
            layers.append(s)
        kept, held = _run(layers, C, W, ks, device)
        full = [torch.cat([s, torch.zeros(B, H, W)], dim=2) for s in layers]
        want = rf.layer_defensive_select_ref(full, C, W, key_start=ks)
        N = L + W
        for layer in range(n_layers):
            for b in range(B):
                k0 = 0 if ks is None else int(ks[b])
                win = list(range(max(k0, L), N))
                for h in range(H):
                    n = int(want.kept_count[layer, b, h])
                    ref_cols = want.kept_idx[layer, b, h, :n].tolist()
                    assert sorted(kept[layer][b][h] + win) == ref_cols, (seed, layer, b, h)
        # bounded: the prefix rows held after each layer never exceed the K slots of a row
        assert max(held) <= B * n_layers * H * C


def test_cascade_refuses_an_extra_layer():
    cas = LayerCascade(1, 2)
    cas.add(torch.rand(1, 2, 5))
    with pytest.raises(RuntimeError, match="more than n_layers"):
        cas.add(torch.rand(1, 2, 5))


def _top_k_mask_ref(v, ok, k):
    """Per row: candidates in the library's order (real scores descending, then NaN; ties to
    the lower position), the first k."""
    out = torch.zeros_like(ok)
    for b in range(v.shape[0]):
        cand = [j for j in range(v.shape[1]) if ok[b, j]]
        real = sorted((j for j in cand if not torch.isnan(v[b, j])),
                      key=lambda j: (-float(v[b, j]), j))
        nan = [j for j in cand if torch.isnan(v[b, j])]
        for j in (real + nan)[:k]:
            out[b, j] = True
    return out


def _top_k_mask_sorted(v, ok, k):
    """The same by two stable sorts (score descending, then the tiers: real, NaN, other)."""
    s = torch.where(ok & ~v.isnan(), v, torch.tensor(float("-inf")))
    o1 = s.sort(dim=1, descending=True, stable=True).indices
    tier = torch.where(ok, v.isnan().to(torch.int8), torch.tensor(2, dtype=torch.int8))
    order = o1.gather(1, tier.gather(1, o1).sort(dim=1, stable=True).indices)
    out = torch.zeros_like(ok)
    out.scatter_(1, order[:, :k], True)
    return out & ok


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_mask_never_lets_a_non_candidate_displace_a_candidate(device):
    """Non-candidates hold every kind of value (NaN, +inf, the row's best) and sit before and
    between the candidates; candidates include NaN, -inf and ties. Long rows too (the select
    kernel's multi-CTA path on CUDA)."""
    for seed, (B, M) in enumerate([(1, 1), (2, 7), (3, 40), (2, 1000), (1, 70000)]):
        g = torch.Generator().manual_seed(seed)
        v = torch.randint(-3, 4, (B, M), generator=g).float()
        r = torch.rand(B, M, generator=g)
        v = torch.where(r < 0.1, torch.tensor(float("nan")), v)
        v = torch.where(r > 0.92, torch.tensor(float("inf")), v)
        v = torch.where((r > 0.85) & (r <= 0.92), torch.tensor(float("-inf")), v)
        ok = torch.rand(B, M, generator=g) < 0.6
        for k in sorted({0, 1, M // 3, M // 2, M - 1, M}):
            if k < 0:
                continue
            want = _top_k_mask_ref(v, ok, k) if M <= 1000 else _top_k_mask_sorted(v, ok, k)
            got = top_k_mask(v.to(device), ok.to(device), k).cpu()
            assert not (got & ~ok).any()
            assert torch.equal(got.sum(1), torch.minimum(ok.sum(1), torch.tensor(k)))
            assert torch.equal(got, want), (seed, k)
