"""``adakv_ops.fusion.fuse_projections``: q/k/v_proj and gate/up_proj fused into one GEMM each,
with the outputs of the unfused model (tiny random models of ``test_hf``, CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_hf import FAMILY_NAMES, make_batch, make_model  # noqa: E402

from adakv_ops.fusion import (FusedLinear, ProjectionSlice, fuse_projections,  # noqa: E402
                              unfuse_projections)


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_model_gives_the_logits_of_the_unfused_one(family):
    ref, fused = make_model(family), make_model(family)
    n = fuse_projections(fused)
    layers = ref.config.num_hidden_layers
    assert n == 2 * layers                              # attention + MLP of every layer
    assert _params(fused) == _params(ref)               # originals dropped, nothing doubled
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionSlice) and isinstance(attn.q_proj.fused, FusedLinear)
    torch.testing.assert_close(attn.k_proj.weight, ref.model.layers[0].self_attn.k_proj.weight,
                               rtol=0, atol=0)
    ids, mask = make_batch(3, 21)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = fused(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # nothing kept between calls: the product is dropped once every slice has read it
    assert attn.q_proj.fused._product is None and attn.q_proj.fused._input is None


@pytest.mark.parametrize("family", ["llama", "qwen2"])   # qwen2: q/k/v with bias, gate/up without
def test_a_fused_model_has_the_unfused_state_dict_and_loads_an_unfused_checkpoint(family):
    ref, fused = make_model(family), make_model(family)
    fuse_projections(fused)
    a, b = ref.state_dict(), fused.state_dict()
    assert list(b) == list(a)                           # same keys, same order, no "fused."
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    # a checkpoint of another (unfused) model loads into the fused one, strictly
    other = make_model(family)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fused.load_state_dict(other.state_dict())
    ids, mask = make_batch(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids, attention_mask=mask).logits,
                                   other(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
    # and the fused model's own state dict round-trips into an unfused one
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids, attention_mask=mask).logits,
                                   other(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


def test_loading_a_bad_checkpoint_into_a_fused_model_names_the_key():
    model = make_model("qwen2")
    fuse_projections(model)
    sd = make_model("qwen2").state_dict()
    k = "model.layers.0.self_attn.k_proj.weight"
    bad = dict(sd)
    bad[k] = sd[k][:-1]
    with pytest.raises(RuntimeError, match="size mismatch for " + k.replace(".", r"\.")):
        model.load_state_dict(bad)
    missing = {n: t for n, t in sd.items() if n != k}
    res = model.load_state_dict(missing, strict=False)
    assert res.missing_keys == [k] and res.unexpected_keys == []
    extra = dict(sd)
    extra["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(1)   # gate_proj has no bias
    with pytest.raises(RuntimeError, match="gate_proj.bias"):
        model.load_state_dict(extra)


def test_unfusing_gives_back_the_linears_and_the_outputs():
    ref, model = make_model("qwen2"), make_model("qwen2")
    n = fuse_projections(model)
    assert unfuse_projections(model) == n
    assert unfuse_projections(model) == 0
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is nn.Linear and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert model.model.layers[0].mlp.up_proj.bias is None and attn.v_proj.bias is not None
    assert _params(model) == _params(ref)
    assert list(model.state_dict()) == list(ref.state_dict())
    ids, mask = make_batch(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


def test_fusing_twice_fuses_nothing_more():
    model = make_model("qwen2")                         # q/k/v with bias, gate/up without
    assert fuse_projections(model) == 8
    assert fuse_projections(model) == 0
    attn = model.model.layers[1].self_attn
    assert attn.v_proj.bias is not None and attn.v_proj.bias.shape == (attn.v_proj.out_features,)


def test_a_slice_called_with_another_input_computes_its_own_product():
    model = make_model("llama")
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    q = attn.q_proj(x)                                  # x's product kept for k and v
    k_y = attn.k_proj(y)                                # another input: computed alone
    torch.testing.assert_close(q, x @ attn.q_proj.weight.t())
    torch.testing.assert_close(k_y, y @ attn.k_proj.weight.t())
    torch.testing.assert_close(attn.v_proj(y), y @ attn.v_proj.weight.t())
    torch.testing.assert_close(attn.v_proj(x), x @ attn.v_proj.weight.t())


def test_groups_that_differ_are_left_alone():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.k_proj = nn.Linear(8, 4).double()      # another dtype
            self.v_proj = nn.Linear(8, 4)
            self.gate_proj = nn.Linear(8, 16)
            self.up_proj = nn.Linear(6, 16)             # another input width

    b = Block()
    assert fuse_projections(b) == 0
    assert type(b.q_proj) is nn.Linear and type(b.gate_proj) is nn.Linear


def test_compiled_fused_forward_is_one_graph_with_the_eager_logits():
    model = make_model("llama")
    fuse_projections(model)
    ids, mask = make_batch(2, 13)
    explain = torch._dynamo.explain(model.forward)(input_ids=ids, attention_mask=mask)
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    f = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(f(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    assert model.model.layers[0].mlp.gate_proj.fused._product is None


@pytest.fixture
def engine_and_settings():
    """The serving engine (skips without the extension) and small settings for it."""
    from conftest import HAVE_OPS
    if not HAVE_OPS:
        pytest.skip("adakv_ops extension not built")
    from adakv_ops.serve import Engine
    return Engine, dict(num_pages=500, max_batch=2, method="ada_snapkv", budget=10, window=4,
                        page_size=4)


def test_the_engine_fuses_unless_told_not_to(engine_and_settings):
    Engine, kw = engine_and_settings
    model = make_model("mistral")
    assert Engine(model, **kw).fused_projections == 8
    assert isinstance(model.model.layers[3].mlp.up_proj, ProjectionSlice)
    plain = make_model("mistral")
    assert Engine(plain, fuse_projections=False, **kw).fused_projections == 0
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear


def test_an_engine_that_refuses_its_settings_leaves_the_model_unfused(engine_and_settings):
    Engine, kw = engine_and_settings
    model = make_model("llama")
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(model, max_prefill_tokens=0, **kw)
    sliding = make_model("gemma3")
    with pytest.raises(NotImplementedError, match="sliding-window"):
        Engine(sliding, **kw)
    for m in (model, sliding):
        assert type(m.model.layers[0].self_attn.q_proj) is nn.Linear
