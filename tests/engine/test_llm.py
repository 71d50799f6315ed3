"""The LLM API on the embedded SmolLM2-135M-Instruct."""

import pytest

from neuronserve import LLM, SamplingParams
from tests.engine.conftest import assert_all_blocks_free
from tests.engine.test_text_stream import cut_inside_tag

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_seqs=8, max_model_len=512, kv_cache_gb=0.25)


def test_generate_keeps_input_order_and_matches_one_at_a_time(llm):
    prompts = ["The best running shoes for flat feet are", "A cast iron pan", "Headphones for commuting"]
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in batched] == prompts
    for prompt, out in zip(prompts, batched):
        (alone,) = llm.generate(prompt, GREEDY, use_tqdm=False)
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    ids = llm.tokenizer.encode(prompts[1])
    (from_ids,) = llm.generate(ids, GREEDY, use_tqdm=False)
    assert from_ids.prompt is None and from_ids.outputs[0].token_ids == batched[1].outputs[0].token_ids
    assert_all_blocks_free(llm.engine)


def test_chat_applies_the_template_and_answers(llm):
    conversations = [
        [{"role": "user", "content": "Is a cast iron pan dishwasher safe?"}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    outs = llm.chat(conversations, [GREEDY, SamplingParams(max_tokens=24, temperature=0, stop=["."])])
    assert "<|im_start|>user" in outs[0].prompt and outs[0].prompt.endswith("<|im_start|>assistant\n")
    assert "dishwasher" in outs[0].outputs[0].text.lower()
    assert "Paris" in outs[1].outputs[0].text and outs[1].outputs[0].stop_reason == "."
    (single,) = llm.chat(conversations[0], GREEDY, use_tqdm=False)
    assert single.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_hold_markup_on_the_model_streams_whole_tags(llm):
    prompt = 'Blenders: <product id="B01"/>, <product id="B02"/>, <product id="B03"/>, <product'
    engine, texts = llm.engine, []
    engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, hold_markup=True), request_id="m")
    while engine.has_unfinished():
        texts += [o.outputs[0].text for o in engine.step()]
    final = texts[-1]
    assert final.count('<product id="') >= 3  # the model writes tags, split over several tokens
    raw = (
        llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0), use_tqdm=False)[0].outputs[0].text
    )
    assert final == raw  # held, never altered
    for text in texts[:-1]:
        assert final.startswith(text) and not cut_inside_tag(final, len(text), bound=256), text


def test_bad_input_raises_and_loses_nothing(llm):
    with pytest.raises(ValueError, match="^sampling_params: 1 given for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY])
    with pytest.raises(ValueError, match="^max_tokens: the prompt's"):
        llm.generate(["fine", "x " * 600], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="^messages: "):
        llm.chat([{"content": "no role"}])
    with pytest.raises(ValueError, match="^prompts: "):
        llm.generate([])
    assert not llm.engine.has_unfinished()
    assert_all_blocks_free(llm.engine)
