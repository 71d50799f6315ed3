"""Each parallel layer keeps the right shard of a full tensor, and the shards reassemble the full
layer's output (checked in one process: the collective is done by hand over the ranks' outputs)."""

import pytest
import torch

from neuronserve.parallel.group import TPGroup
from neuronserve.parallel.heads import HeadLayout
from neuronserve.parallel.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    head_rows,
)


class RankOf(TPGroup):
    """A rank's view of a group, with no peers: the test performs the collectives itself."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


def ranks(size):
    return [RankOf(r, size) for r in range(size)]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_column_and_merged_column_shards_concatenate_to_the_full_output(tp):
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 12), torch.randn(10, 12), torch.randn(10)
    gate, up = torch.randn(7, 12), torch.randn(7, 12)
    outs, merged = [], []
    for group in ranks(tp):
        col = ColumnParallelLinear(12, 10, bias=True, group=group)
        col.weight_loader(col.weight, w)
        col.weight_loader(col.bias, b)
        assert col.weight.shape == (-(-10 // tp), 12)
        outs.append(torch.nn.functional.linear(x, col.weight, col.bias))
        m = MergedColumnParallelLinear(12, [7, 7], group=group)
        m.weight_loader(m.weight, gate, 0)
        m.weight_loader(m.weight, up, 1)
        assert m.weight.shape == (2 * -(-7 // tp), 12)
        merged.append(torch.nn.functional.linear(x, m.weight).chunk(2, dim=-1))
    torch.testing.assert_close(torch.cat(outs, -1)[:, :10], x @ w.T + b)
    torch.testing.assert_close(torch.cat([g for g, _ in merged], -1)[:, :7], x @ gate.T)
    torch.testing.assert_close(torch.cat([u for _, u in merged], -1)[:, :7], x @ up.T)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_row_parallel_partial_sums_add_up_with_the_bias_once(tp):
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 11), torch.randn(6, 11), torch.randn(6)
    total = torch.zeros(5, 6)
    for group in ranks(tp):
        row = RowParallelLinear(11, 6, bias=True, group=group)
        row.weight_loader(row.weight, w)
        row.weight_loader(row.bias, b)
        assert row.weight.shape == (6, -(-11 // tp))
        assert (row.collective is None) == (tp == 1)
        local_x = torch.stack([x[:, i] if i is not None else torch.zeros(5) for i in row.in_index], -1)
        total += torch.nn.functional.linear(local_x, row.weight, row.bias)
    torch.testing.assert_close(total, x @ w.T + b)


@pytest.mark.parametrize(("heads", "kv_heads", "tp"), [(9, 3, 2), (9, 3, 4), (8, 4, 2), (7, 1, 2), (5, 5, 2)])
def test_qkv_and_o_proj_shards_compute_attention_heads_exactly(heads, kv_heads, tp):
    """Per rank: q/k/v heads are the full projection's heads named by the layout (zeros for
    padding), and o_proj's partial sums add up to the full o_proj over the real heads."""
    torch.manual_seed(0)
    hd, hidden = 4, 16
    layout = HeadLayout(heads, kv_heads, tp)
    wq, wk, wv = (
        torch.randn(heads * hd, hidden),
        torch.randn(kv_heads * hd, hidden),
        torch.randn(kv_heads * hd, hidden),
    )
    wo = torch.randn(hidden, heads * hd)
    x = torch.randn(3, hidden)
    q_full = (x @ wq.T).view(3, heads, hd)
    k_full = (x @ wk.T).view(3, kv_heads, hd)
    head_out = torch.randn(3, heads, hd)  # stand-in for each real head's attention output
    total = torch.zeros(3, hidden)
    for group in ranks(tp):
        qkv = QKVParallelLinear(hidden, hd, layout, group=group)
        for part, w in zip("qkv", (wq, wk, wv)):
            qkv.weight_loader(qkv.weight, w, part)
        assert qkv.weight.shape == ((layout.q_per_rank + 2 * layout.kv_per_rank) * hd, hidden)
        q_size, kv_size = layout.q_per_rank * hd, layout.kv_per_rank * hd
        q, k, _ = (x @ qkv.weight.T).split([q_size, kv_size, kv_size], -1)
        q, k = q.view(3, -1, hd), k.view(3, -1, hd)
        for i, src in enumerate(layout.q_heads(group.rank)):
            torch.testing.assert_close(q[:, i], q_full[:, src] if src is not None else torch.zeros(3, hd))
        for i, src in enumerate(layout.kv_heads(group.rank)):
            torch.testing.assert_close(k[:, i], k_full[:, src])
        o = RowParallelLinear(
            heads * hd, hidden, group=group, in_index=head_rows(layout.q_heads(group.rank), hd)
        )
        o.weight_loader(o.weight, wo)
        assert o.weight.shape == (hidden, layout.q_per_rank * hd)
        # a padding head's output is garbage (attention over zero queries); its zero columns drop it
        local = torch.stack(
            [head_out[:, s] if s is not None else torch.randn(3, hd) for s in layout.q_heads(group.rank)], 1
        )
        total += local.reshape(3, -1) @ o.weight.T
    torch.testing.assert_close(total, head_out.reshape(3, -1) @ wo.T)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_embedding_and_lm_head(tp):
    torch.manual_seed(0)
    vocab, hidden = 13, 6
    table = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 3, 12, 7, 7])
    x = torch.randn(2, hidden)
    rows, logits = torch.zeros(5, hidden), []
    for group in ranks(tp):
        emb = VocabParallelEmbedding(vocab, hidden, group)
        emb.weight_loader(emb.weight, table)
        assert emb.weight.shape == (-(-vocab // tp), hidden)
        rows += emb(ids)  # RankOf's all-reduce is the identity: the rows this rank holds, zeros elsewhere
        head = ParallelLMHead(hidden, vocab, group)
        head.weight_loader(head.weight, table)
        logits.append(x @ head.weight.T)
    torch.testing.assert_close(rows, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], x @ table.T)


def test_a_wrong_shape_is_refused_with_both_shapes():
    col = ColumnParallelLinear(12, 10, group=RankOf(0, 2))
    with pytest.raises(ValueError, match=r"has shape \(10, 11\), expected \(10, 12\)"):
        col.weight_loader(col.weight, torch.zeros(10, 11))


@pytest.mark.parametrize("method", ["int8", "fp8", "int4", "transposed"])
def test_module_swaps_keep_each_layer_collective(method):
    """Quantization and the CPU transposed layout replace the parallel linears; the all-reduce /
    all-gather that finishes their output must come along."""
    from neuronserve.backends.cpu_layout import TransposedLinear, use_transposed_linears
    from neuronserve.config import ModelConfig
    from neuronserve.model.llama import LlamaForCausalLM
    from neuronserve.parallel.layers import AllGatherColumns, AllReduce
    from neuronserve.quant import QuantizedLinear, quantize_model

    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config, RankOf(1, 2))
    if method == "transposed":
        use_transposed_linears(model)
        swapped = TransposedLinear
    else:
        quantize_model(model, method, modules_to_not_convert=["embed_tokens"])
        swapped = QuantizedLinear
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.o_proj, swapped) and isinstance(model.lm_head, swapped)
    assert isinstance(attn.o_proj.collective, AllReduce) and isinstance(mlp.down_proj.collective, AllReduce)
    assert isinstance(model.lm_head.collective, AllGatherColumns)
    assert attn.qkv_proj.collective is None
