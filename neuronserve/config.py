"""Configuration dataclasses shared by every layer.

Only the standard library is imported here, so the scheduler library (`neuronserve.core`) stays
importable without torch. Each dataclass validates itself in ``__post_init__`` and raises
``ValueError`` naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TOKEN_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


@dataclass
class SchedulerConfig:
    """Limits of one scheduling step and of the waiting queue.

    Attributes:
        max_num_seqs: most sequences in one step (the batch size ``B``).
        max_num_batched_tokens: token budget of one step (``T``); never above the largest bucket.
        max_model_len: most tokens (prompt + output) one sequence may hold.
        token_buckets: the static ``T`` sizes graphs are compiled for; each step is padded up to the
            smallest bucket that holds its tokens.
        max_waiting: most requests waiting for admission; beyond it ``add_request`` raises
            ``QueueFullError`` (``None``: unbounded).
        num_speculative_tokens: most draft tokens a decode verifies in one step (0: no speculative
            decoding); the static-graph backends size each bucket's logit rows for it.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    token_buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS
    max_waiting: int | None = 256
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        _require(
            self.num_speculative_tokens >= 0,
            "num_speculative_tokens",
            f"must be >= 0, got {self.num_speculative_tokens}",
        )
        _require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _require(self.max_model_len >= 1, "max_model_len", f"must be >= 1, got {self.max_model_len}")
        buckets = tuple(sorted(set(self.token_buckets)))
        _require(len(buckets) > 0, "token_buckets", "must list at least one size")
        _require(buckets[0] >= 1, "token_buckets", f"sizes must be >= 1, got {buckets}")
        self.token_buckets = buckets
        _require(
            1 <= self.max_num_batched_tokens <= buckets[-1],
            "max_num_batched_tokens",
            f"must be in [1, largest token bucket {buckets[-1]}], got {self.max_num_batched_tokens}",
        )
        _require(
            self.max_num_seqs <= self.max_num_batched_tokens,
            "max_num_seqs",
            f"{self.max_num_seqs} sequences cannot each decode one token within "
            f"max_num_batched_tokens={self.max_num_batched_tokens}",
        )
        _require(
            self.max_waiting is None or self.max_waiting >= 1,
            "max_waiting",
            f"must be >= 1 or None, got {self.max_waiting}",
        )


SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass
class SpeculativeConfig:
    """Speculative decoding, as vLLM's ``speculative_config``: a proposer drafts up to
    ``num_speculative_tokens`` tokens per decode and the target model verifies them in one step.

    Attributes:
        method: ``ngram`` (prompt lookup: the tokens that followed the latest earlier occurrence of
            the last ``prompt_lookup_min..prompt_lookup_max`` tokens) or ``draft_model`` (a smaller
            model with the same tokenizer, named by ``model``).
        num_speculative_tokens: drafts per step (``k``); a request verifies ``k + 1`` positions.
        model: the draft model (``draft_model`` only): a name, a Hugging Face directory or a GGUF file.
        prompt_lookup_min / prompt_lookup_max: n-gram sizes tried, longest first (``ngram`` only).
        disable_by_batch_size: no drafts in a step with at least this many running requests (large
            batches are compute-bound, where rejected drafts cost real time); ``None``: never. The
            default, 4, is a small CPU's: its int8 GEMM is compute-bound from a few rows, and four
            requests verifying four drafts each are 20 (at 8 concurrent on 2 cores, drafting up to
            16 running requests measured 1.00x in decode steps, up to 4 1.17x). An accelerator
            stays bound by weight reads to far larger batches: raise it there.
        min_acceptance_rate: a request whose recent drafts were accepted less often than this stops
            drafting for a while (rejected drafts cost compute and bring nothing).
        adaptive: measure, per batch size (in powers of two), the output tokens a second of decode
            steps with drafts and without, and draft only where drafting is the faster; every 16th
            step of a size goes the other way, so both figures stay current. ``False``: draft
            whenever the rules above allow.
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    model: str | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    disable_by_batch_size: int | None = 4
    min_acceptance_rate: float = 0.1
    adaptive: bool = True

    def __post_init__(self) -> None:
        name = "speculative_config."
        _require(
            self.method in SPECULATIVE_METHODS,
            name + "method",
            f"must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}",
        )
        k = self.num_speculative_tokens
        _require(
            isinstance(k, int) and 1 <= k <= 16,
            name + "num_speculative_tokens",
            f"must be in [1, 16], got {k!r}",
        )
        _require(
            (self.model is not None) == (self.method == "draft_model"),
            name + "model",
            "names the draft model, and only for method 'draft_model'",
        )
        _require(
            1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
            name + "prompt_lookup_min",
            f"must satisfy 1 <= prompt_lookup_min <= prompt_lookup_max, got "
            f"{self.prompt_lookup_min}, {self.prompt_lookup_max}",
        )
        _require(
            self.disable_by_batch_size is None or self.disable_by_batch_size >= 1,
            name + "disable_by_batch_size",
            f"must be >= 1 or None, got {self.disable_by_batch_size}",
        )
        _require(
            0.0 <= self.min_acceptance_rate < 1.0,
            name + "min_acceptance_rate",
            f"must be in [0, 1), got {self.min_acceptance_rate}",
        )

    @classmethod
    def from_dict(cls, config: dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From vLLM's dict form (``{"method": "ngram", "num_speculative_tokens": 4}``); unknown
        keys raise ``ValueError`` naming them."""
        if config is None or isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config: expected a dict, got {type(config).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known)
        _require(not unknown, "speculative_config", f"unknown keys {unknown}; known: {sorted(known)}")
        return cls(**config)


@dataclass
class CacheConfig:
    """The paged KV cache.

    Attributes:
        block_size: tokens per KV block.
        num_blocks: blocks in the pool, including block 0, which is reserved as the pad block that
            padding tokens write to and block tables are padded with.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes across requests.
        cache_dtype: ``auto`` (the model's dtype), ``int8`` or ``fp8`` (e4m3): one byte per value,
            with a calibrated scale per layer and head.
    """

    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        _require(
            self.num_blocks >= 2,
            "num_blocks",
            f"must be >= 2 (block 0 is the reserved pad block), got {self.num_blocks}",
        )
        _require(
            self.cache_dtype in ("auto", "int8", "fp8"),
            "cache_dtype",
            f"must be auto, int8 or fp8, got {self.cache_dtype!r}",
        )

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ModelConfig:
    """The shape of a Llama-family model (read from a Hugging Face ``config.json`` or a GGUF file)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture: {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"{self.num_attention_heads} query heads are not a multiple of {self.num_key_value_heads}",
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads",
            )
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelConfig:
        architectures = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = architectures[0]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            architecture=arch,
        )

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _rope_scaling(cfg: dict) -> dict | None:
    """The rope scaling dict, or None for plain RoPE (transformers 5 calls it rope_parameters)."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else dict(scaling)


@dataclass
class ParallelConfig:
    """How a model is split across devices.

    Attributes:
        tensor_parallel_size: ranks every layer is sharded over (processes on CPU, NeuronCores on
            Neuron).
        target: a Neuron family (``inf2``, ``trn1``, ``trn2``) or instance type
            (``inf2.48xlarge``); when set, the degree must be one Neuron supports there and fit the
            instance's NeuronCores.
    """

    tensor_parallel_size: int = 1
    target: str | None = None

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        _require(tp >= 1, "tensor_parallel_size", f"must be >= 1, got {tp}")
        if self.target is None:
            return
        from neuronserve.hardware import INSTANCES, NEURON_TP_DEGREES, neuron_family

        family = neuron_family(self.target)
        allowed = NEURON_TP_DEGREES[family]
        degrees = f"{allowed[0]}-{allowed[-1]}" if family == "trn2" else ", ".join(map(str, allowed))
        _require(
            tp in allowed,
            "tensor_parallel_size",
            f"{tp} is not a degree {family} supports; choose one of {degrees}",
        )
        instance = INSTANCES.get(self.target.lower())
        cores = instance.cores if instance is not None else None
        if cores is not None and tp > cores:
            bigger = [i.name for i in INSTANCES.values() if i.family == family and i.cores >= tp]
            _require(
                False,
                "tensor_parallel_size",
                f"{tp} exceeds the {cores} NeuronCores of {self.target}; "
                f"{' or '.join(bigger) or 'no instance of this family'} has enough",
            )


@dataclass
class CompileConfig:
    """How the static-graph backends (``cpu-traced``, ``neuron``) build their graphs.

    Attributes:
        context_buckets: context lengths (tokens) graphs are built for, besides ``max_model_len``;
            a step uses the smallest one that holds its longest sequence. The static attention
            gathers each token's context, so a step costs ``tokens x context`` of gathers: small
            context buckets keep short requests cheap.
        artifact_cache: where compiled graphs are kept: a directory or ``s3://bucket/prefix``
            (``None``: ``~/.cache/neuronserve/artifacts``).
        optlevel: neuronx-cc optimization level (``-O1`` compiles fastest, ``-O2`` is its default).
        auto_cast: neuronx-cc ``--auto-cast`` (``none`` keeps the model's dtype; ``matmult`` casts
            matrix multiplies to bf16).
        lnc: logical NeuronCore size on Trn2 (1 or 2; ``None``: the compiler's default).
        target: the Neuron instance type compiled for (``inf2.48xlarge``); the weights and KV cache
            are checked to fit it before compiling.
        extra_compiler_args: appended to the compiler arguments as they are.
        progress: show a progress bar per bucket while compiling.
    """

    context_buckets: tuple[int, ...] = (256, 1024)
    artifact_cache: str | None = None
    optlevel: int = 1
    auto_cast: str = "none"
    lnc: int | None = None
    target: str | None = None
    extra_compiler_args: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        self.context_buckets = tuple(sorted(set(self.context_buckets)))
        _require(
            all(c >= 1 for c in self.context_buckets),
            "context_buckets",
            f"lengths must be >= 1, got {self.context_buckets}",
        )
        _require(self.optlevel in (1, 2, 3), "optlevel", f"must be 1, 2 or 3, got {self.optlevel}")
        _require(
            self.auto_cast in ("none", "matmult", "all"),
            "auto_cast",
            f"must be none, matmult or all, got {self.auto_cast!r}",
        )
        _require(self.lnc in (None, 1, 2), "lnc", f"must be 1, 2 or None, got {self.lnc}")
        if self.target is not None:
            from neuronserve.hardware import get_instance

            get_instance(self.target)

    def compiler_args(self) -> list[str]:
        """neuronx-cc arguments, in a fixed order (they are part of the artifact cache key)."""
        args = ["--model-type=transformer", f"--auto-cast={self.auto_cast}", f"-O{self.optlevel}"]
        if self.lnc is not None:
            args.append(f"--lnc={self.lnc}")
        return args + list(self.extra_compiler_args)
