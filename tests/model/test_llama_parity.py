"""Our paged, flat-batch forward against transformers' LlamaForCausalLM on tiny random configs."""

import torch

from neuronserve.backends.inputs import SeqChunk
from tests.model.conftest import PagedRunner

ATOL = 1e-4


@torch.inference_mode()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0]  # (len, vocab)


def test_full_prefill_matches_every_position(model_pair):
    hf, ours = model_pair
    ids = torch.randint(0, 211, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = PagedRunner(ours)
    table = runner.blocks(len(ids))
    # One sequence per prefix length: the logits of every position, each from a full prefill.
    expected = hf_logits(hf, ids)
    for end in (1, 7, 16, 23):
        runner = PagedRunner(ours)
        got = runner.step([SeqChunk(ids[:end], 0, runner.blocks(end))])
        torch.testing.assert_close(got[0], expected[end - 1], atol=ATOL, rtol=0)
    assert table  # the runner handed out real blocks (not the pad block)


def test_prefill_in_three_chunks_then_decode(model_pair):
    hf, ours = model_pair
    ids = torch.randint(0, 211, (19,), generator=torch.Generator().manual_seed(2)).tolist()
    runner = PagedRunner(ours)
    table = runner.blocks(40)
    seq = list(ids)
    for start, end in ((0, 5), (5, 13), (13, 19)):
        logits = runner.step([SeqChunk(seq[start:end], start, table)])
    torch.testing.assert_close(logits[0], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)
    for _ in range(6):  # greedy decode, one token at a time
        token = int(logits[0].argmax())
        seq.append(token)
        logits = runner.step([SeqChunk([token], len(seq) - 1, table)])
        torch.testing.assert_close(logits[0], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)


def test_mixed_batch_equals_each_sequence_alone(model_pair):
    hf, ours = model_pair
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 211, (n,), generator=gen).tolist() for n in (11, 6, 9)]
    runner = PagedRunner(ours)
    tables = [runner.blocks(32) for _ in prompts]
    # Sequences 1 and 2 prefill first; then one step mixes seq 0's prefill with their decodes.
    runner.step([SeqChunk(prompts[1], 0, tables[1]), SeqChunk(prompts[2], 0, tables[2])])
    decode_tokens = [5, 17]
    logits = runner.step(
        [
            SeqChunk(prompts[0], 0, tables[0]),
            SeqChunk([decode_tokens[0]], len(prompts[1]), tables[1]),
            SeqChunk([decode_tokens[1]], len(prompts[2]), tables[2]),
        ]
    )
    full = [prompts[0], prompts[1] + [decode_tokens[0]], prompts[2] + [decode_tokens[1]]]
    for i, seq in enumerate(full):
        torch.testing.assert_close(logits[i], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)


def test_padding_to_a_bucket_changes_no_logits(model_pair):
    _, ours = model_pair
    prompts = [[3, 4, 5, 6, 7], [9, 8, 7]]
    plain, padded = PagedRunner(ours), PagedRunner(ours)
    tables = [plain.blocks(16), plain.blocks(16)]
    padded.next_block = plain.next_block
    chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    a = plain.step(chunks)
    b = padded.step(chunks, num_tokens=16, num_seqs=4, max_blocks=8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.isfinite(padded.kv).all()  # padding wrote finite values to the pad block only
    assert padded.kv[:, :, 0].abs().sum() > 0 and plain.kv[:, :, 0].abs().sum() == 0
