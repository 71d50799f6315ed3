import json

import pytest
import torch
from safetensors.torch import save_file

from neuronserve.backends.inputs import SeqChunk
from neuronserve.config import ModelConfig
from neuronserve.model.loader import load_model, resolve_model_path
from tests.model.conftest import PagedRunner, make_pair


def save_hf_dir(tmp_path, hf, sharded=False):
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if not sharded:
        save_file(state, str(tmp_path / "model.safetensors"))
        return
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_directory_loads_to_the_same_logits(tmp_path, sharded):
    hf, ours = make_pair("gqa-9-3-llama3")
    save_hf_dir(tmp_path, hf, sharded)
    loaded, config, hf_dir = load_model(str(tmp_path))
    assert hf_dir == tmp_path and config.num_key_value_heads == 3
    chunk = [3, 1, 4, 1, 5, 9, 2, 6]
    a, b = PagedRunner(ours), PagedRunner(loaded)
    torch.testing.assert_close(
        a.step([SeqChunk(chunk, 0, a.blocks(8))]), b.step([SeqChunk(chunk, 0, b.blocks(8))]), atol=0, rtol=0
    )


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known model name"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_directory_without_weights_is_a_clear_error(tmp_path):
    hf, _ = make_pair("mha-5-tied")
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_pickle_checkpoints_load_only_weights_only(tmp_path):
    hf, ours = make_pair("mha-5-tied")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    loaded, _, _ = load_model(str(tmp_path))  # plain tensors: weights_only loading works
    torch.testing.assert_close(loaded.embed_tokens.weight, ours.embed_tokens.weight)

    class Payload:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    torch.save({"model.norm.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        load_model(str(tmp_path))


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="^architecture: .*LlamaForCausalLM"):
        ModelConfig.from_hf_config(
            dict(
                architectures=["GPT2LMHeadModel"],
                vocab_size=10,
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
            )
        )


def test_wrong_shapes_and_unknown_tensors_are_refused():
    hf, ours = make_pair("mqa-7-1")
    state = dict(hf.state_dict())
    state["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        ours.load_weights(state.items())
    with pytest.raises(ValueError, match="unexpected tensor"):
        ours.load_weights([("model.layers.0.mystery.weight", torch.ones(1))])
    with pytest.raises(ValueError, match="missing tensors"):
        ours.load_weights(list(hf.state_dict().items())[:-3])
