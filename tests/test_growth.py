"""Growth on real models: identity growth changes no logit, copy growth is G_stack's duplication, random growth
uses the architecture's init; KV-cache generation on a grown rack; errors before any weight loads."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_causal_lm, tiny_config
from transformers import AutoModelForCausalLM

from hf_stackwise.rack.growth import allocate, check_growth, initialize
from hf_stackwise.rack.rack import Rack, arranged
from hf_stackwise.schedule.phases import RecipeError, Schedule

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 200, 31]])


def grown(model, grow, train="new"):
    """Allocate and initialise the growth of a two-phase schedule; returns (layout, blocks before, blocks after)."""
    schedule = Schedule.from_list(
        [{"name": "base", "until": 0.5}, {"name": "g", "until": 1.0, "grow": grow, "train": train}]
    )
    rack = Rack.from_model(model)
    layout = schedule.layout(rack.sizes)
    check_growth(model, rack.layers_path, layout)
    allocate(model, rack.layers_path, layout)
    for new in layout.grown[1]:
        initialize(model, rack.layers_path, layout, new, seed=0, step=5)
    return rack.layers_path, layout.blocks(layout.orders[0]), layout.blocks(layout.orders[1])


def logits(model, path, blocks, ids=IDS):
    with torch.no_grad(), arranged(model, path, blocks):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("at", ["top", "bottom", "interleave", [1, 3]])
def test_identity_growth_changes_no_logit(family, at):
    model = tiny_causal_lm(family).eval()
    for p in model.parameters():  # trained-looking weights, not the init's small ones
        p.data.add_(torch.randn_like(p) * 0.05)
    path = Rack.from_model(model).layers_path
    before = logits(model, path, list(range(4)))
    stacks = 2 if at != [1, 3] else None
    path, old, new = grown(
        model, {"op": "identity", "stacks": stacks, "at": at} if stacks else {"op": "identity", "at": at}
    )
    assert len(new) == 6
    after = logits(model, path, new)
    assert (after - before).abs().max() < 1e-6
    # the new blocks really are new: every weight but the zeroed projections copies its source
    blocks = model.get_submodule(path)
    assert sum(int(torch.count_nonzero(p)) for p in blocks[4].parameters()) > 0


def test_copy_growth_is_the_gstack_duplication():
    model = tiny_causal_lm("llama").eval()
    path, _, new = grown(model, {"op": "copy", "stacks": 4})
    assert new == list(range(8))
    # the same function as a plain 8-layer model whose layers 4..7 repeat layers 0..3
    config = copy.deepcopy(tiny_causal_lm("llama").config)
    config.num_hidden_layers = 8
    reference = AutoModelForCausalLM.from_config(config).eval()
    state = {}
    for name, value in model.state_dict().items():
        state[name] = value
    reference.load_state_dict({k: v for k, v in state.items() if k in reference.state_dict()})
    for i in range(4):
        for (_, a), (_, b) in zip(
            reference.model.layers[i + 4].named_parameters(), reference.model.layers[i].named_parameters(), strict=True
        ):
            assert torch.equal(a, b)
    expected = reference(input_ids=IDS).logits
    assert torch.equal(logits(model, path, new), expected.detach())


def test_random_growth_uses_the_architecture_init_and_is_seeded():
    model = tiny_causal_lm("llama")
    path, _, _ = grown(model, {"op": "random", "stacks": 1})
    block = model.get_submodule(path)[4]
    assert torch.equal(block.input_layernorm.weight, torch.ones(64))  # RMSNorm init
    std = block.self_attn.q_proj.weight.std().item()
    assert abs(std - model.config.initializer_range) < 0.004
    assert not torch.equal(block.self_attn.q_proj.weight, model.get_submodule(path)[3].self_attn.q_proj.weight)
    again = tiny_causal_lm("llama")
    grown(again, {"op": "random", "stacks": 1})
    assert torch.equal(again.get_submodule(path)[4].self_attn.q_proj.weight, block.self_attn.q_proj.weight)
    third = tiny_causal_lm("llama", seed=1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    grown(third, {"op": "random", "stacks": 1})
    assert torch.equal(torch.rand(3), expected)  # growth did not consume the training RNG stream


def test_allocation_keeps_config_consistent_and_is_idempotent():
    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window = True, 8
    config.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    model = AutoModelForCausalLM.from_config(config)
    path, _, new = grown(model, {"op": "copy", "stacks": 1, "at": "bottom"})
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert model.config.layer_types[4] == "full_attention"  # the copy of block 0 keeps its attention type
    assert [m.self_attn.layer_idx for m in model.model.layers] == [0, 1, 2, 3, 4]
    with arranged(model, path, new):
        assert [m.self_attn.layer_idx for m in model.model.layers] == [0, 1, 2, 3, 4]
        assert model.model.layers[0] is model.model._modules["layers"][4]
        assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 2
    assert model.model.layers[0].self_attn.layer_idx == 0 and model.config.layer_types[4] == "full_attention"
    layout = Schedule.from_list(
        [{"until": 0.5}, {"until": 1.0, "grow": {"op": "copy", "stacks": 1, "at": "bottom"}, "train": "new"}]
    ).layout(Rack.from_model(model).sizes)
    allocate(model, path, layout)  # a model already grown for this layout stays as it is
    assert len(model.model.layers) == 5


def sliding_qwen2():
    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2-sliding"])
def test_generate_with_kv_cache_on_a_grown_rack(family):
    # qwen2-sliding: the caches follow each position's attention type, so layer indices must follow positions
    model = (sliding_qwen2() if family == "qwen2-sliding" else tiny_causal_lm(family)).eval()
    path, _, new = grown(model, {"op": "copy", "stacks": 2, "at": "bottom"})
    prompt = IDS[:, :5]
    with torch.no_grad(), arranged(model, path, new):
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # and step by step with the cache equals the full forward
    with torch.no_grad(), arranged(model, path, new):
        full = model(input_ids=cached).logits[:, -1]
        out = model(input_ids=cached[:, :-1], use_cache=True)
        step = model(input_ids=cached[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
    assert (full - step).abs().max() < 1e-5


def test_identity_on_post_norm_blocks_is_refused():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("bert"))
    schedule = Schedule.from_list(
        [{"until": 0.5}, {"until": 1.0, "grow": {"op": "identity", "stacks": 1}, "train": "new"}]
    )
    rack = Rack.from_model(model)
    with pytest.raises(RecipeError, match=r"schedule\[1\].grow.op: `identity` needs pre-norm blocks, but BertLayer"):
        check_growth(model, rack.layers_path, schedule.layout(rack.sizes))


def test_identity_without_recognisable_projections_says_which():
    model = tiny_causal_lm("llama")
    for block in model.model.layers:
        block.mlp.out = block.mlp.down_proj
        del block.mlp.down_proj
    schedule = Schedule.from_list(
        [{"until": 0.5}, {"until": 1.0, "grow": {"op": "identity", "stacks": 1}, "train": "new"}]
    )
    with pytest.raises(RecipeError, match=r"has no an MLP down projection \(one of mlp.down_proj"):
        check_growth(model, "model.layers", schedule.layout(4))
