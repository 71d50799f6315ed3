"""The embedded default model (SmolLM2-135M-Instruct, GGUF) against transformers on the same file."""

import functools

import pytest
import torch

from neuronserve.backends import get_backend
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.core import Request, Scheduler
from neuronserve.model.loader import load_model, resolve_model_path
from neuronserve.model.tokenizer import IncrementalDetokenizer, Tokenizer

PROMPTS = [
    "Which running shoes are best for flat feet?",
    "Is this blender dishwasher safe?",
    "Compare the battery life of these two headphones.",
    "What is the capital of France?",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    model, config, hf_dir = load_model("smollm2-135m-instruct")
    return model, config, Tokenizer.from_dir(hf_dir)


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    tok = smollm2[2]
    return [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


def test_config_read_from_the_gguf(smollm2):
    _, config, tok = smollm2
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152
    assert tok.eos_token_id == 2 and tok.decode(tok.encode("Hello world")) == "Hello world"


def transformers_model_from_gguf(path):
    """transformers' own GGUF loader, the oracle: it shares no code with ours. It opens the file
    twice and builds a tensor-name map for each of the model's ~400 modules (~20 s here); one reader
    and one map per (arch, layers), the same objects each time, bring that to ~9 s."""
    import gguf
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return model.eval()


def test_greedy_tokens_equal_transformers_on_the_same_file(smollm2, prompt_ids):
    model, config, _ = smollm2
    # Ours: all four prompts batched through the real scheduler and the CPU backend.
    sched_cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=256)
    cache_cfg = CacheConfig(block_size=16, num_blocks=64)
    scheduler = Scheduler(sched_cfg, cache_cfg)
    runner = get_backend("cpu").build_runner(model, config, cache_cfg, sched_cfg)
    for i, ids in enumerate(prompt_ids):
        scheduler.add_request(Request(str(i), ids, max_tokens=NEW_TOKENS, eos_token_id=None))
    outputs = {}
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        tokens = runner.execute(out).argmax(-1).tolist()
        for r in scheduler.update(out, tokens):
            outputs[int(r.request_id)] = r.output_token_ids
    scheduler.block_manager.check_integrity()

    hf = transformers_model_from_gguf(resolve_model_path("smollm2-135m-instruct"))
    hf.generation_config.eos_token_id = None  # like ours: exactly NEW_TOKENS tokens, eos included
    for i, ids in enumerate(prompt_ids):
        with torch.inference_mode():
            input_ids = torch.tensor([ids])
            # An explicit mask: inferred from pad_token_id=2 it would hide the prompt's <|im_end|>.
            ref = hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=2,
            )[0, len(ids) :].tolist()
        assert outputs[i] == ref, f"prompt {i}: {outputs[i]} != {ref}"


def test_token_id_beyond_the_vocabulary_is_refused(smollm2):
    model, config, _ = smollm2
    sched_cfg, cache_cfg = SchedulerConfig(max_model_len=64), CacheConfig(num_blocks=8)
    scheduler = Scheduler(sched_cfg, cache_cfg)
    runner = get_backend("cpu").build_runner(model, config, cache_cfg, sched_cfg)
    scheduler.add_request(Request("bad", [1, 2, config.vocab_size], max_tokens=2))
    with pytest.raises(ValueError, match="^prompt_token_ids: token id 49152 >= vocab_size 49152"):
        runner.execute(scheduler.schedule())


@pytest.mark.parametrize(
    "text",
    [
        "Prix: 12,99 € — très bon 👍🏽 produit",
        "日本語のレビュー：とても良い。",
        " leading space and  double  spaces",
    ],
)
def test_incremental_detokenizer_streams_exact_text(smollm2, text):
    tok = smollm2[2]
    prompt = tok.encode("Review:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == tok.decode(ids) == detok.text
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0x7FF for c in text):
        assert "" in deltas  # some token ended mid-character and was held back


def test_ngram_speculation_keeps_the_greedy_tokens_of_the_parity_prompts(smollm2, prompt_ids):
    """Prompt lookup on the real model: the answers quote their questions, so drafts are accepted,
    and the tokens equal plain greedy decoding's (which equal transformers', above)."""
    from neuronserve.config import SpeculativeConfig
    from neuronserve.engine.engine import Engine
    from neuronserve.engine.params import SamplingParams
    from neuronserve.engine.spec import build_speculator

    model, config, tok = smollm2
    sched_cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=256)
    cache_cfg = CacheConfig(block_size=16, num_blocks=64)
    runner = get_backend("cpu").build_runner(model, config, cache_cfg, sched_cfg)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outputs = []
    for spec in (
        None,
        SpeculativeConfig(
            num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3, disable_by_batch_size=None
        ),
    ):
        speculator = build_speculator(spec) if spec else None
        engine = Engine(runner, tok, config, sched_cfg, cache_cfg, speculator=speculator)
        ids = [engine.add_request(p, params) for p in prompt_ids]
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        engine.scheduler.block_manager.check_integrity()
        outputs.append([done[i] for i in ids])
    assert outputs[1] == outputs[0]
    assert speculator.stats.num_accepted_tokens > 0
