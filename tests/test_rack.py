"""The rack on tiny models: block-list detection per family, stack boundaries, the parameter -> unit map
(tied weights included), the active-depth switch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_causal_lm, tiny_config
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM

from hf_stackwise.rack.rack import Rack, find_layers_path, resolve_boundaries
from hf_stackwise.schedule.phases import RecipeError

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "bert", "roberta")


def masked_lm(family: str, layers: int = 4):
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(tiny_config(family, layers))


def base_model(family: str, layers: int = 4):
    torch.manual_seed(0)
    return AutoModel.from_config(tiny_config(family, layers))


# ---- block-list detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, family, cls, path",
    [
        (tiny_causal_lm, "llama", "LlamaForCausalLM", "model.layers"),
        (tiny_causal_lm, "qwen2", "Qwen2ForCausalLM", "model.layers"),
        (tiny_causal_lm, "mistral", "MistralForCausalLM", "model.layers"),
        (tiny_causal_lm, "gpt2", "GPT2LMHeadModel", "transformer.h"),
        (tiny_causal_lm, "gpt_neox", "GPTNeoXForCausalLM", "gpt_neox.layers"),
        (base_model, "llama", "LlamaModel", "layers"),
        (base_model, "qwen2", "Qwen2Model", "layers"),
        (base_model, "gpt2", "GPT2Model", "h"),
        (base_model, "gpt_neox", "GPTNeoXModel", "layers"),
        (base_model, "bert", "BertModel", "encoder.layer"),
        (base_model, "roberta", "RobertaModel", "encoder.layer"),
        (masked_lm, "bert", "BertForMaskedLM", "bert.encoder.layer"),
        (masked_lm, "roberta", "RobertaForMaskedLM", "roberta.encoder.layer"),
    ],
)
def test_block_list_is_detected(build, family, cls, path):
    model = build(family, 4)
    assert type(model).__name__ == cls
    assert find_layers_path(model) == path
    rack = Rack.from_model(model)
    assert rack.layers_path == path
    assert rack.blocks is model.get_submodule(path)
    assert len(rack.blocks) == 4
    assert rack.boundaries == (0, 1, 2, 3, 4)  # one block per stack by default
    assert rack.num_stacks == 4 and rack.num_blocks == 4
    assert rack.topology() == {"layers": path, "num_blocks": 4, "boundaries": [0, 1, 2, 3, 4]}


class TwoLists(nn.Module):
    """An architecture hf_stackwise does not know: no config, two block lists of the same length."""

    def __init__(self, n=3, m=3):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder_blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.decoder_blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(m))
        self.out = nn.Linear(8, 10)


class OneList(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.trunk = nn.Sequential()
        self.trunk.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.out = nn.Linear(8, 10)


def test_unknown_architecture_asks_for_rack_layers():
    with pytest.raises(RecipeError) as info:
        Rack.from_model(TwoLists())
    assert len(info.value.problems) == 1
    message = info.value.problems[0]
    assert message.startswith("rack.layers: cannot tell where TwoLists keeps its transformer blocks")
    assert "(candidates: encoder_blocks, decoder_blocks)" in message
    assert "set `rack.layers` to the dotted path of the block list" in message


def test_unknown_architecture_without_any_list():
    with pytest.raises(RecipeError, match=r"^rack\.layers: cannot tell where Linear keeps .* set `rack\.layers`"):
        find_layers_path(nn.Linear(2, 2))


def test_a_single_module_list_is_found_anywhere():
    assert find_layers_path(OneList()) == "trunk.blocks"


def test_the_config_block_count_picks_among_lists():
    model = TwoLists(n=3, m=2)
    model.config = SimpleNamespace(num_hidden_layers=2)
    assert find_layers_path(model) == "decoder_blocks"
    model.config = SimpleNamespace(n_layer=3)
    assert find_layers_path(model) == "encoder_blocks"
    model.config = SimpleNamespace(num_hidden_layers=5)
    with pytest.raises(RecipeError, match=r"^rack\.layers: cannot tell"):
        find_layers_path(model)


def test_explicit_layers_path():
    model = TwoLists()
    assert find_layers_path(model, "decoder_blocks") == "decoder_blocks"
    rack = Rack.from_model(model, layers="encoder_blocks", blocks_per_stack=3)
    assert rack.blocks is model.encoder_blocks
    assert rack.boundaries == (0, 3)
    llama = tiny_causal_lm("llama", 4)
    assert Rack.from_model(llama, layers="model.layers").blocks is llama.model.layers


@pytest.mark.parametrize("path", ["model.norm", "model", "model.embed_tokens", "model.nope", "lm_head.weight", ""])
def test_explicit_layers_path_must_be_a_module_list(path):
    model = tiny_causal_lm("llama", 4)
    with pytest.raises(RecipeError) as info:
        find_layers_path(model, path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(
        f"rack.layers: {path!r} does not name a torch.nn.ModuleList of blocks in LlamaForCausalLM"
    )


# ---- boundaries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_blocks, blocks_per_stack, boundaries, expected",
    [
        (4, None, None, (0, 1, 2, 3, 4)),
        (4, 1, None, (0, 1, 2, 3, 4)),
        (4, 2, None, (0, 2, 4)),
        (4, 4, None, (0, 4)),
        (6, 3, None, (0, 3, 6)),
        (4, None, [1, 3], (0, 1, 3, 4)),
        (4, None, [0, 1, 3], (0, 1, 3, 4)),
        (4, None, [1, 3, 4], (0, 1, 3, 4)),
        (4, None, [0, 1, 3, 4], (0, 1, 3, 4)),
        (4, None, [2], (0, 2, 4)),
        (4, None, [0], (0, 4)),
        (4, None, [4], (0, 4)),
        (4, None, (1, 2), (0, 1, 2, 4)),
    ],
)
def test_resolve_boundaries(num_blocks, blocks_per_stack, boundaries, expected):
    assert resolve_boundaries(num_blocks, blocks_per_stack, boundaries) == expected


@pytest.mark.parametrize(
    "num_blocks, blocks_per_stack, boundaries, start",
    [
        (4, 3, None, "rack.blocks_per_stack: 3 does not divide the model's 4 blocks"),
        (4, 8, None, "rack.blocks_per_stack: 8 does not divide the model's 4 blocks"),
        (4, 0, None, "rack.blocks_per_stack: 0 is not a positive integer"),
        (4, -2, None, "rack.blocks_per_stack: -2 is not a positive integer"),
        (4, 1.5, None, "rack.blocks_per_stack: 1.5 is not a positive integer"),
        (4, True, None, "rack.blocks_per_stack: True is not a positive integer"),
        (4, "2", None, "rack.blocks_per_stack: '2' is not a positive integer"),
        (4, None, [3, 1], "rack.boundaries: [3, 1] must be strictly increasing block indices"),
        (4, None, [1, 1, 3], "rack.boundaries: [1, 1, 3] must be strictly increasing"),
        (4, None, [0, 0, 2], "rack.boundaries: [0, 0, 2] must be strictly increasing"),
        (4, None, [5, 4], "rack.boundaries: [5, 4] must be strictly increasing"),
        (4, None, [-1, 2], "rack.boundaries: [-1, 2] must be strictly increasing"),
        (4, None, [2, 5], "rack.boundaries: [2, 5] goes beyond the model's 4 blocks"),
        (4, None, [0, 4, 8], "rack.boundaries: [0, 4, 8] goes beyond the model's 4 blocks"),
        (4, None, [], "rack.boundaries: [] is not a list of block indices"),
        (4, None, [1.5], "rack.boundaries: [1.5] is not a list of block indices"),
        (4, None, [True, 2], "rack.boundaries: [True, 2] is not a list of block indices"),
        (4, None, ["1"], "rack.boundaries: ['1'] is not a list of block indices"),
        (4, 2, [2], "rack: give either `blocks_per_stack` or `boundaries`, not both"),
        (4, 1, [], "rack: give either `blocks_per_stack` or `boundaries`, not both"),
    ],
)
def test_resolve_boundaries_errors(num_blocks, blocks_per_stack, boundaries, start):
    with pytest.raises(RecipeError) as info:
        resolve_boundaries(num_blocks, blocks_per_stack, boundaries)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(start), info.value.problems[0]


def test_from_model_passes_boundaries_through():
    model = tiny_causal_lm("llama", 4)
    rack = Rack.from_model(model, boundaries=[1])
    assert rack.boundaries == (0, 1, 4)
    assert [list(rack.stack_blocks(i)) for i in range(rack.num_stacks)] == [[0], [1, 2, 3]]
    assert Rack.from_model(model, blocks_per_stack=2).boundaries == (0, 2, 4)
    with pytest.raises(RecipeError, match=r"^rack\.blocks_per_stack: 3 does not divide"):
        Rack.from_model(model, blocks_per_stack=3)


# ---- parameter units ------------------------------------------------------------------------------


def ids(params) -> set[int]:
    return {id(p) for p in params}


def tied_ids(model) -> set[int]:
    """Parameters registered under more than one name."""
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    return {i for i, count in names.items() if count > 1}


@pytest.mark.parametrize(
    "build, family, tied",
    [
        (tiny_causal_lm, "llama", False),
        (tiny_causal_lm, "gpt2", True),
        (tiny_causal_lm, "gpt_neox", False),
        (masked_lm, "bert", True),
        (base_model, "roberta", False),
    ],
)
def test_every_parameter_is_in_exactly_one_unit_except_tied_ones(build, family, tied):
    model = build(family, 4)
    rack = Rack.from_model(model, boundaries=[1])
    units = rack.parameter_units()
    assert list(units) == ["embeddings", "stack_0", "stack_1", "head"]
    owners: dict[int, list[str]] = {}
    for unit, params in units.items():
        assert len(ids(p for _, p in params)) == len(params), f"{unit} lists a tensor twice"
        for _, p in params:
            owners.setdefault(id(p), []).append(unit)
    assert set(owners) == ids(model.parameters())
    shared = {i: u for i, u in owners.items() if len(u) > 1}
    assert all(u == ["embeddings", "head"] for u in shared.values())
    input_embeddings = model.get_input_embeddings().weight
    assert set(shared) == ({id(input_embeddings)} if tied else set())
    assert set(shared) <= tied_ids(model)
    for s in range(rack.num_stacks):
        expected = ids(p for b in rack.stack_blocks(s) for p in rack.blocks[b].parameters())
        assert ids(p for _, p in units[f"stack_{s}"]) == expected
    assert units["embeddings"] and units["head"] or family == "roberta"  # a base model may have no head params


def test_gpt2_tied_embeddings_are_in_both_units():
    model = tiny_causal_lm("gpt2", 4)
    assert model.lm_head.weight is model.transformer.wte.weight
    units = Rack.from_model(model, blocks_per_stack=2).parameter_units()
    embeddings = dict(units["embeddings"])
    head = dict(units["head"])
    assert list(embeddings) == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert list(head) == ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    assert head["lm_head.weight"] is embeddings["transformer.wte.weight"]
    total = sum(len(p) for p in units.values())
    assert total == len(list(model.parameters())) + 1


def test_llama_units_by_name():
    model = tiny_causal_lm("llama", 4)
    rack = Rack.from_model(model, blocks_per_stack=2)
    units = {u: [n for n, _ in ps] for u, ps in rack.parameter_units().items()}
    assert units["embeddings"] == ["model.embed_tokens.weight"]
    assert units["head"] == ["model.norm.weight", "lm_head.weight"]
    all_names = [n for n, _ in model.named_parameters()]
    for s, blocks in ((0, (0, 1)), (1, (2, 3))):
        expected = [n for n in all_names if any(n.startswith(f"model.layers.{b}.") for b in blocks)]
        assert units[f"stack_{s}"] == expected  # registration order
    assert sum(len(v) for v in units.values()) == len(all_names)


# ---- active depth ---------------------------------------------------------------------------------

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 1], [8, 8, 300, 2, 19, 64, 128, 511]])


def shallow_copy(family, model, keep_blocks, layers_path):
    """A model built with ``keep_blocks`` layers that holds the first blocks' weights of ``model``."""
    short = tiny_causal_lm(family, keep_blocks, seed=1).eval()
    dropped = tuple(f"{layers_path}.{b}." for b in range(keep_blocks, len(model.get_submodule(layers_path))))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    short.load_state_dict(state, strict=True)
    return short


@pytest.mark.parametrize(
    "family, blocks_per_stack, stacks, keep",
    [("llama", 1, 2, 2), ("llama", 2, 1, 2), ("llama", 1, 1, 1), ("gpt2", 1, 3, 3)],
)
def test_active_depth_runs_only_the_first_stacks(family, blocks_per_stack, stacks, keep):
    model = tiny_causal_lm(family, 4).eval()
    rack = Rack.from_model(model, blocks_per_stack=blocks_per_stack)
    full = rack.blocks
    with torch.no_grad():
        deep = model(input_ids=IDS).logits
        with rack.active_depth(stacks):
            assert len(model.get_submodule(rack.layers_path)) == keep
            shallow = model(input_ids=IDS).logits
        expected = shallow_copy(family, model, keep, rack.layers_path)(input_ids=IDS).logits
        after = model(input_ids=IDS).logits
    torch.testing.assert_close(shallow, expected, rtol=0, atol=0)
    assert not torch.equal(shallow, deep)
    assert rack.blocks is full and len(full) == 4
    assert model.get_submodule(rack.layers_path) is full
    torch.testing.assert_close(after, deep, rtol=0, atol=0)


def test_active_depth_full_is_a_no_op():
    model = tiny_causal_lm("llama", 4)
    rack = Rack.from_model(model, blocks_per_stack=2)
    full = rack.blocks
    with rack.active_depth(2):
        assert rack.blocks is full
    assert rack.blocks is full


def test_active_depth_restores_after_an_exception():
    model = tiny_causal_lm("llama", 4)
    rack = Rack.from_model(model)
    full = model.model.layers
    with pytest.raises(RuntimeError, match="boom"), rack.active_depth(1):
        assert len(model.model.layers) == 1
        raise RuntimeError("boom")
    assert model.model.layers is full
    assert rack.blocks is full and len(full) == 4


def test_active_depth_on_a_base_model_without_dotted_path():
    model = base_model("gpt2", 4).eval()
    rack = Rack.from_model(model)
    full = model.h
    with torch.no_grad(), rack.active_depth(2):
        assert len(model.h) == 2
        assert model.h[1] is full[1]
        hidden = model(input_ids=IDS).last_hidden_state
    assert model.h is full
    assert hidden.shape == (2, 8, 64)


def test_active_depth_keeps_every_block_registered():
    model = tiny_causal_lm("llama", 4)
    rack = Rack.from_model(model)
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    with rack.active_depth(2):
        assert list(model.state_dict()) == keys
        assert [n for n, _ in model.named_parameters()] == names
