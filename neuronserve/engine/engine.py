"""The engine: one step schedules, runs the model, samples, advances the scheduler and streams text.

``step()`` is three phases, so that ``AsyncEngine`` can run the middle one (the model, seconds of
CPU) in a worker thread while requests arrive and leave on the event loop:
``schedule()`` → ``execute(out)`` (runner + sampler; touches no scheduler state) → ``process(...)``
(``Scheduler.update``, detokenizer, stop strings, outputs).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from neuronserve.backends.base import ModelRunner
from neuronserve.config import (
    CacheConfig,
    CompileConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from neuronserve.core import FinishReason, Request, Scheduler, SchedulerOutput
from neuronserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from neuronserve.engine.params import SamplingParams
from neuronserve.engine.sampler import Sampler, SamplerOutput, SamplingState, TokenLogprobs
from neuronserve.engine.spec import DraftRequest, Speculator, build_speculator
from neuronserve.engine.text import TextStream
from neuronserve.model.tokenizer import IncrementalDetokenizer, Tokenizer


class _Tracked:
    """The engine's side of one request: sampling state, text, timing."""

    __slots__ = ("request", "params", "prompt", "sampling", "detokenizer", "text", "metrics", "logprobs")

    def __init__(self, request, params, prompt, detokenizer, metrics) -> None:
        self.request: Request = request
        self.params: SamplingParams = params
        self.prompt: str | None = prompt
        self.sampling = SamplingState.create(params, request.prompt_token_ids, request.output_token_ids)
        self.detokenizer: IncrementalDetokenizer | None = detokenizer
        self.text = TextStream(params.stop_strings, params.hold_markup, params.max_markup_chars)
        self.metrics: RequestMetrics = metrics
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None


@dataclass
class StepResult:
    """What ``execute`` hands to ``process``: the sampled rows of the step and their tokens; with
    speculative decoding also the tokens each verifying request emitted (accepted drafts + one)
    and the drafts proposed for each request's next step."""

    rows: list[int]  # batch indices of the requests that got one sampled token
    sampled: SamplerOutput
    verified: dict[int, list[int]] = field(default_factory=dict)  # batch index -> emitted tokens
    proposals: dict[int, list[int]] = field(default_factory=dict)  # batch index -> next drafts


class Engine:
    """Continuous batching over one model runner. Not thread-safe: drive it from one thread, or
    through ``AsyncEngine``."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer | None,
        model_config: ModelConfig,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        seed: int = 0,
        speculator: Speculator | None = None,
    ) -> None:
        """``speculator``: speculative decoding (see ``neuronserve.engine.spec``); it sets
        ``scheduler_config.num_speculative_tokens`` (a static-graph runner must have been built
        with that value already, as ``from_pretrained`` does)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_config = model_config
        if speculator is not None:
            scheduler_config = dataclasses.replace(scheduler_config, num_speculative_tokens=speculator.k)
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.scheduler = Scheduler(scheduler_config, cache_config)
        self.sampler = Sampler(seed)
        self.speculator = speculator
        self.eos_token_ids = model_config.eos_token_ids
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids = list(dict.fromkeys([tokenizer.eos_token_id, *self.eos_token_ids]))
        self.model_dir = None  # the Hugging Face directory the model loaded from, if any
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        backend: str = "cpu",
        dtype=None,
        scheduler_config: SchedulerConfig | None = None,
        cache_config: CacheConfig | None = None,
        kv_cache_gb: float | None = None,
        quantization: str | None = None,
        modules_to_not_convert: Sequence[str] | None = None,
        tensor_parallel_size: int = 1,
        compile_config: CompileConfig | None = None,
        seed: int = 0,
        kernels: str = "native",
        speculative_config: SpeculativeConfig | dict | None = None,
    ) -> Engine:
        """Load ``model`` (a name, a Hugging Face directory or a GGUF file) onto ``backend``.
        ``kv_cache_gb`` (GiB, per rank), when given, sizes the KV cache instead of
        ``cache_config.num_blocks``; ``quantization`` (``int8``, ``fp8``, ``int4``) quantizes the
        linear layers after loading, but those named in ``modules_to_not_convert`` (default: the
        embedding and the LM head). ``tensor_parallel_size`` > 1 shards the model over that many
        processes (this one and spawned workers); call ``close()`` to stop them.
        ``compile_config``: buckets, compiler arguments and artifact cache of the static-graph
        backends (``cpu-traced``, ``neuron``). ``kernels``: ``native`` (the C++ kernels, default)
        or ``torch`` on the ``cpu`` backend. ``speculative_config``: speculative decoding, as a
        ``SpeculativeConfig`` or vLLM's dict (``{"method": "ngram", "num_speculative_tokens": 4}``)."""
        import torch

        from neuronserve.backends import get_backend
        from neuronserve.backends.build import ModelSpec, build_rank

        ParallelConfig(tensor_parallel_size)  # validates it
        if kernels not in ("native", "torch"):
            raise ValueError(f"kernels: {kernels!r} is not one of native, torch")
        backend_impl = get_backend(backend)  # unknown names fail before any model loads
        spec_config = SpeculativeConfig.from_dict(speculative_config)
        scheduler_config = scheduler_config or SchedulerConfig()
        if spec_config is not None:
            k = spec_config.num_speculative_tokens
            scheduler_config = dataclasses.replace(scheduler_config, num_speculative_tokens=k)
        spec = ModelSpec(
            model=model,
            backend=backend,
            dtype=str(dtype or torch.float32).removeprefix("torch."),
            quantization=quantization,
            modules_to_not_convert=modules_to_not_convert,
            scheduler_config=scheduler_config,
            cache_config=cache_config or CacheConfig(),
            kv_cache_gb=kv_cache_gb,
            tensor_parallel_size=tensor_parallel_size,
            compile_config=compile_config,
            kernels=kernels,
        )
        if tensor_parallel_size == 1 or backend_impl.shards_itself:
            built = build_rank(spec)
            runner, config, cache_config, model_dir = (
                built.runner,
                built.model_config,
                built.cache_config,
                built.model_dir,
            )
        else:
            from neuronserve.backends.multiproc import TensorParallelRunner

            runner = TensorParallelRunner(spec)
            config, cache_config, model_dir = runner.model_config, runner.cache_config, runner.model_dir
        try:
            tokenizer = Tokenizer.from_dir(model_dir)
            speculator = None
            if spec_config is not None:
                speculator = build_speculator(
                    spec_config, target=spec, target_config=config, target_tokenizer=tokenizer
                )
            engine = cls(runner, tokenizer, config, spec.scheduler_config, cache_config, seed, speculator)
        except BaseException:
            runner.shutdown()
            raise
        engine.model_dir = model_dir
        return engine

    def close(self) -> None:
        """Abort what is still running and release the runner's processes (tensor-parallel
        workers). The engine cannot step afterwards."""
        for request_id in list(self._tracked):
            self.abort(request_id)
        self.runner.shutdown()

    # ---------------------------------------------------------------- requests in and out
    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request and return its id. ``prompt`` is text or token ids. Raises
        ``ValueError`` naming the bad field, or ``QueueFullError``; nothing is queued then."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else request_id
        text, token_ids = self._tokenize(prompt)
        vocab = self.model_config.vocab_size
        if token_ids and not all(0 <= t < vocab for t in token_ids):
            bad = next(t for t in token_ids if not 0 <= t < vocab)
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})")
        max_len = self.scheduler_config.max_model_len
        max_tokens = params.max_tokens or max_len - len(token_ids)
        if max_tokens < 1:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens leave no room to generate within max_model_len={max_len}"
            )
        eos, *other_eos = self.eos_token_ids or [None]
        request = Request(
            request_id,
            token_ids,
            max_tokens=max_tokens,
            priority=priority,
            eos_token_id=eos,
            stop_token_ids=[*params.stop_token_ids, *([] if params.ignore_eos else other_eos)],
            ignore_eos=params.ignore_eos,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(request)  # validates; raises before anything is recorded
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        metrics = RequestMetrics(
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            num_prompt_tokens=len(token_ids),
        )
        self._tracked[request_id] = _Tracked(request, params, text, detokenizer, metrics)
        return request_id

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this engine has no tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return None, list(prompt)
        raise ValueError(f"prompt: expected text or a list of token ids, got {type(prompt).__name__}")

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request and free its KV blocks; returns its last output (``None`` if unknown)."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        self.scheduler.abort(request_id)
        if self.speculator is not None:
            self.speculator.release(request_id)
        tracked.metrics.finished_time = time.monotonic()
        return self._output(tracked, "", [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self._tracked)

    # ---------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Run one step; return an output for each request that got a token or finished."""
        out = self.schedule()
        if not out.requests:
            return []
        return self.process(out, self.execute(out))

    def schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        now = time.monotonic()
        for request in out.requests:
            metrics = self._tracked[request.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        return out

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run the model and sample (verify drafts, propose the next ones). Reads scheduler state,
        never writes it."""
        start = time.perf_counter()
        logits = self.runner.execute(out)
        if out.spec_token_ids or self.speculator is not None:
            return self._execute_speculative(out, logits, start)
        rows = [i for i in range(len(out)) if out.samples(i)]
        states = [self._tracked[out.requests[i].request_id].sampling for i in rows]
        return StepResult(rows, self.sampler(logits[rows] if len(rows) < len(out) else logits, states))

    def _execute_speculative(self, out: SchedulerOutput, logits, start: float) -> StepResult:
        """``execute`` when requests may verify drafts: their rows of ``logits`` (one per position,
        see ``ModelRunner.execute``) go to the speculator; the others are sampled as usual. A
        decode-only step's time and tokens go to the speculator's adaptive switch."""
        ends = list(itertools.accumulate(out.num_logits(i) for i in range(len(out))))
        rows, verified = [], {}
        for i, request in enumerate(out.requests):
            drafts = out.spec_token_ids.get(request.request_id)
            if drafts is None:
                if out.samples(i):
                    rows.append(i)
                continue
            sampling = self._tracked[request.request_id].sampling
            generator = sampling.generator or self.sampler.generator
            row_logits = logits[ends[i] - len(drafts) - 1 : ends[i]]
            verified[i] = self.speculator.verify(
                request.request_id, row_logits, drafts, sampling.params, generator
            )
        states = [self._tracked[out.requests[i].request_id].sampling for i in rows]
        sampled = self.sampler(logits[[ends[i] - 1 for i in rows]], states)
        result = StepResult(rows, sampled, verified)
        if self.speculator is not None:
            result.proposals = self._propose(out, result)
            if out.num_decodes == len(out):
                tokens = len(rows) + sum(map(len, verified.values()))
                self.speculator.observe(len(out), bool(verified), tokens, time.perf_counter() - start)
        return result

    def _propose(self, out: SchedulerOutput, result: StepResult) -> dict[int, list[int]]:
        """The drafts each request that got tokens this step verifies in its next step."""
        emitted = dict(zip(result.rows, ([t] for t in result.sampled.token_ids)))
        emitted.update(result.verified)
        rows = sorted(emitted)
        drafting = []
        for i in rows:
            request = out.requests[i]
            sampling = self._tracked[request.request_id].sampling
            generator = sampling.generator or self.sampler.generator
            tokens = request.all_token_ids + emitted[i]
            drafting.append(DraftRequest(request.request_id, tokens, sampling.params, generator))
        proposals = self.speculator.propose(drafting, len(self.scheduler.running))
        return dict(zip(rows, proposals))

    def process(self, out: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        tokens: list[int | list[int] | None] = [None] * len(out)
        for row, token in zip(result.rows, result.sampled.token_ids):
            tokens[row] = token
        for row, emitted in result.verified.items():
            tokens[row] = emitted
        num_outputs = {row: len(out.requests[row].output_token_ids) for row in result.verified}
        self.scheduler.update(out, tokens)
        now = time.monotonic()
        outputs = []
        logprobs_of = dict(zip(result.rows, result.sampled.logprobs))
        for row in sorted([*result.rows, *result.verified]):
            request = out.requests[row]
            tracked = self._tracked.get(request.request_id)
            if tracked is None:
                continue  # aborted while the step ran
            if row in result.verified:  # the tokens the scheduler kept (cut at a stop or max_tokens)
                new_tokens = request.output_token_ids[num_outputs[row] :]
            else:
                new_tokens = [tokens[row]]
            logprobs = logprobs_of.get(row)
            if tracked.logprobs is not None and logprobs is not None:
                tracked.logprobs.append(logprobs)
            delta = self._push_tokens(tracked, new_tokens, now)
            if request.is_finished:
                tracked.metrics.finished_time = now
                tracked.metrics.num_preemptions = request.num_preemptions
                del self._tracked[request.request_id]
                if self.speculator is not None:
                    self.speculator.release(request.request_id)
            else:
                request.spec_token_ids = result.proposals.get(row, [])
            outputs.append(self._output(tracked, delta, new_tokens))
        return outputs

    def _push_tokens(self, tracked: _Tracked, new_tokens: list[int], now: float) -> str:
        """Detokenize a request's new tokens and check its stop strings; returns the text delta.
        A stop string completed before the last new token drops the tokens after it, as if they had
        never been generated (they can come from one step's accepted drafts)."""
        request, metrics = tracked.request, tracked.metrics
        metrics.token_times.extend([now] * len(new_tokens))
        metrics.last_token_time = now
        if metrics.first_token_time is None:
            metrics.first_token_time = now
            metrics.num_cached_tokens = request.num_cached_tokens
        stopped_by_token = request.finish_reason is FinishReason.STOP
        delta = ""
        for j, token in enumerate(new_tokens):
            last = j == len(new_tokens) - 1
            text = ""
            if tracked.detokenizer is not None and not (last and stopped_by_token):
                text = tracked.detokenizer.add(token)
            delta += tracked.text.push(text, final=last and request.is_finished)
            if tracked.text.stopped_by is not None:
                drop = len(new_tokens) - j - 1
                if drop:
                    del request.output_token_ids[-drop:], metrics.token_times[-drop:], new_tokens[-drop:]
                if not request.is_finished:
                    self.scheduler.finish_request(request.request_id, FinishReason.STOP)
                else:
                    request.finish_reason = FinishReason.STOP
                break
        return delta

    def _output(self, tracked: _Tracked, delta_text: str, delta_token_ids: list[int]) -> RequestOutput:
        request, text = tracked.request, tracked.text
        reason = request.finish_reason
        stop_reason: str | int | None = text.stopped_by
        last = request.output_token_ids[-1] if request.output_token_ids else None
        if stop_reason is None and reason is FinishReason.STOP and last in tracked.params.stop_token_ids:
            stop_reason = last
        completion = CompletionOutput(
            index=0,
            text_source=text,
            num_chars=text.released,
            token_source=request.output_token_ids,
            num_tokens=len(request.output_token_ids),
            finish_reason=None if reason is None else reason.value,
            stop_reason=stop_reason,
            logprobs_source=tracked.logprobs,
            num_logprobs=0 if tracked.logprobs is None else len(tracked.logprobs),
            delta_text=delta_text,
            delta_token_ids=delta_token_ids,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=tracked.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=reason is not None,
            metrics=tracked.metrics,
        )


def blocks_for_memory(
    config: ModelConfig,
    scheduler_config: SchedulerConfig,
    block_size: int,
    gib: float,
    itemsize: int,
    kv_heads: int | None = None,
) -> int:
    """KV blocks (the pad block included) that ``gib`` GiB hold, capped at what ``max_num_seqs``
    sequences of ``max_model_len`` tokens can use; raises ``ValueError`` if not even one fits.
    ``kv_heads``: the KV heads one rank caches (default: the model's; see ``HeadLayout``)."""
    if gib <= 0:
        raise ValueError(f"kv_cache_gb: must be > 0, got {gib}")
    kv_heads = config.num_key_value_heads if kv_heads is None else kv_heads
    block_bytes = 2 * config.num_hidden_layers * block_size * kv_heads * config.head_dim
    block_bytes *= itemsize
    blocks_per_seq = -(-scheduler_config.max_model_len // block_size)
    fit = int(gib * 2**30) // block_bytes
    if fit < blocks_per_seq + 1:
        raise ValueError(
            f"kv_cache_gb: {gib} GiB hold {fit} blocks of {block_size} tokens, fewer than one sequence of "
            f"max_model_len={scheduler_config.max_model_len} needs ({blocks_per_seq} + the pad block)"
        )
    return min(fit, scheduler_config.max_num_seqs * blocks_per_seq + 1)
