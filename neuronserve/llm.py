"""``LLM``: offline generation in a few lines, vLLM-style.

llm = LLM()                                   # SmolLM2-135M-Instruct on CPU
outs = llm.chat([{"role": "user", "content": "Is a cast iron pan dishwasher safe?"}],
                SamplingParams(max_tokens=64, temperature=0))
print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Sequence

from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig, SpeculativeConfig
from neuronserve.core import QueueFullError
from neuronserve.engine.engine import Engine
from neuronserve.engine.outputs import RequestOutput
from neuronserve.engine.params import SamplingParams
from neuronserve.model.loader import DEFAULT_MODEL

Prompt = str | Sequence[int]
Conversation = list[dict]


class LLM:
    """A model on a backend with a continuous-batching engine, for offline generation.

    Args:
        model: a model name (``smollm2-135m-instruct``), a Hugging Face directory or a GGUF file.
        backend: ``cpu`` (eager), ``cpu-traced`` (one compiled graph per bucket, on CPU) or
            ``neuron`` (one ``torch_neuronx`` graph per bucket; needs the Neuron SDK).
        dtype: the weights' dtype (``torch.float32`` by default: fast on CPU).
        max_num_seqs: most sequences decoded together (the batch size).
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
        max_model_len: most tokens (prompt + output) per sequence.
        block_size: tokens per KV-cache block.
        num_blocks: KV-cache blocks; by default as many as ``kv_cache_gb`` holds, capped at what
            ``max_num_seqs`` sequences of ``max_model_len`` tokens could use.
        kv_cache_gb: memory for the KV cache when ``num_blocks`` is not given, in GiB.
        enable_prefix_caching: reuse the KV of identical prompt prefixes.
        quantization: ``int8``, ``fp8`` or ``int4`` weight-only quantization of the linear layers
            (int4 in groups of 32); ``None`` keeps ``dtype``.
        modules_to_not_convert: name fragments of linear layers left unquantized (default: the
            embedding and the LM head; ``[]`` quantizes the LM head too).
        kv_cache_dtype: ``auto`` (the weights' dtype), ``int8`` or ``fp8``: one byte per cached
            value, so ``kv_cache_gb`` holds 4x the blocks of an fp32 cache.
        tensor_parallel_size: shard every layer over this many processes (this one and spawned
            workers, gloo on CPU); ``kv_cache_gb`` is then per rank. Call ``close()`` (or use the
            ``LLM`` as a context manager) to stop the workers; they also stop when this process ends.
        artifact_cache: where ``cpu-traced`` / ``neuron`` keep compiled graphs: a directory or
            ``s3://bucket/prefix`` (default ``~/.cache/neuronserve/artifacts``).
        compile_config: all compile settings (context buckets, compiler flags, target instance);
            ``artifact_cache`` overrides its cache location.
        seed: seed of the sampler shared by requests without their own ``seed``.
        kernels: ``native`` (default): the ``cpu`` backend runs its linear layers and attention
            on neuronserve's C++ kernels; ``torch``: on torch's ops, for comparison.
        speculative_config: speculative decoding, as in vLLM: ``{"method": "ngram",
            "num_speculative_tokens": 4}`` (prompt lookup) or ``{"method": "draft_model", "model":
            ..., "num_speculative_tokens": 4}`` (a smaller model with the same tokenizer); see
            ``SpeculativeConfig``. Greedy outputs are unchanged token for token, sampled ones keep
            the target model's distribution.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        backend: str = "cpu",
        dtype=None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int = 2048,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_gb: float = 1.0,
        enable_prefix_caching: bool = True,
        token_buckets: Sequence[int] | None = None,
        quantization: str | None = None,
        modules_to_not_convert: Sequence[str] | None = None,
        kv_cache_dtype: str = "auto",
        tensor_parallel_size: int = 1,
        artifact_cache: str | None = None,
        compile_config: CompileConfig | None = None,
        seed: int = 0,
        kernels: str = "native",
        speculative_config: dict | SpeculativeConfig | None = None,
    ) -> None:
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            **({"token_buckets": tuple(token_buckets)} if token_buckets else {}),
            max_waiting=None,
        )
        cache_config = CacheConfig(
            block_size=block_size,
            num_blocks=num_blocks or 2,
            enable_prefix_caching=enable_prefix_caching,
            cache_dtype=kv_cache_dtype,
        )
        self.engine = Engine.from_pretrained(
            model,
            backend=backend,
            dtype=dtype,
            scheduler_config=scheduler_config,
            cache_config=cache_config,
            kv_cache_gb=None if num_blocks else kv_cache_gb,
            quantization=quantization,
            modules_to_not_convert=modules_to_not_convert,
            tensor_parallel_size=tensor_parallel_size,
            compile_config=_with_cache(compile_config, artifact_cache),
            seed=seed,
            kernels=kernels,
            speculative_config=speculative_config,
        )
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any. The ``LLM`` cannot generate afterwards."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in input order."""
        prompt_list = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompt_list))
        return self._run(prompt_list, params, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate a reply to each conversation (a list of ``{"role", "content"}`` messages),
        rendered with the model's chat template."""
        if not isinstance(messages, Sequence) or not messages:
            raise ValueError("messages: expected a conversation or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        for conversation in conversations:
            if not conversation or not all(isinstance(m, dict) and "role" in m for m in conversation):
                raise ValueError("messages: each message is a dict with 'role' and 'content'")
        prompt_ids = [self.tokenizer.apply_chat_template(c) for c in conversations]
        outputs = self._run(prompt_ids, _per_prompt(sampling_params, len(prompt_ids)), use_tqdm)
        for out in outputs:
            out.prompt = self.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
        return outputs

    def _run(
        self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.engine
        pending = deque(enumerate(prompts))
        index_of: dict[str, int] = {}
        results: list[RequestOutput | None] = [None] * len(prompts)
        num_tokens, start = 0, time.perf_counter()
        try:
            with tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while pending or engine.has_unfinished():
                    while pending:  # admit as many as the queue takes; the rest as it drains
                        i, prompt = pending[0]
                        request_id = f"llm-{next(self._ids)}"
                        try:
                            engine.add_request(prompt, params[i], request_id=request_id)
                        except QueueFullError:
                            break
                        pending.popleft()
                        index_of[request_id] = i
                    for out in engine.step():
                        num_tokens += len(out.outputs[0].delta_token_ids)
                        if out.finished:
                            results[index_of.pop(out.request_id)] = out
                            bar.update(1)
                            bar.set_postfix_str(f"{num_tokens / (time.perf_counter() - start):.1f} tok/s")
        finally:
            for request_id in index_of:  # on an error or Ctrl-C, leave no request behind
                engine.abort(request_id)
        return results


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts: expected text, token ids, or a non-empty list of them")
    return list(prompts)


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params: {len(params)} given for {n} prompts")
    return params


def _with_cache(compile_config: CompileConfig | None, artifact_cache: str | None) -> CompileConfig | None:
    if artifact_cache is None:
        return compile_config
    return dataclasses.replace(compile_config or CompileConfig(), artifact_cache=artifact_cache)
