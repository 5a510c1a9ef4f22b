"""adakv_ops.cascade.LayerCascade (Layer-DefensiveKV's bounded global top-k, SPEC 7.3) against
the unbounded fp64 oracle: after the last layer, the rows every layer keeps (its new columns,
re-trimmed as later layers arrive) are exactly the global top-k over all layers, on tie-heavy
scores with NaN, -inf and padding; and the retained rows never exceed the final cache."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import make_key_start, rand_scores, tie_scores

from adakv_ops.cascade import LayerCascade

rf = importlib.import_module("adakv_ops.reference_followups")


def _run(layer_scores, C, W, ks):
    """Feed the layers one by one; apply every re-trim to per-segment column lists."""
    B, H, L = layer_scores[0].shape
    cas = LayerCascade(len(layer_scores), C)
    kept = []                    # kept[layer][b][h] = ascending prefix columns
    held = []
    for s in layer_scores:
        idx, cnt, retrim = cas.add(s, ks)
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


@pytest.mark.parametrize("n_layers", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["ties", "rand", "special"])
def test_cascade_is_the_global_top_k(n_layers, kind):
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
        kept, held = _run(layers, C, W, ks)
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
