"""What a replica is: the engine it builds and the resources it asks for, as picklable dataclasses
(a Ray actor rebuilds its engine from these after a restart, on any node)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EngineSpec:
    """The arguments of ``Engine.from_pretrained`` that a replica's engine is built from.

    ``num_blocks`` (KV blocks) wins over ``kv_cache_gb`` (GiB) when given. ``torch_threads``: the
    intra-op threads of one replica (``None``: torch's default), so replicas sharing a host do not
    oversubscribe its cores.
    """

    model: str = "smollm2-135m-instruct"
    served_model_name: str | None = None
    backend: str = "cpu"
    kernels: str = "native"
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_waiting: int | None = 256
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float = 1.0
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    artifact_cache: str | None = None  # compiled graphs (cpu-traced, neuron): a directory or s3://…
    torch_threads: int | None = None
    api_key: str | None = None

    @property
    def name(self) -> str:
        """The model name clients send."""
        return self.served_model_name or self.model

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self):
        """Load the model and return an ``Engine`` (seconds; run it where the engine will live)."""
        from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig
        from neuronserve.engine.engine import Engine

        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_waiting=self.max_waiting,
        )
        cache_config = CacheConfig(
            block_size=self.block_size,
            num_blocks=self.num_blocks or 2,
            enable_prefix_caching=self.enable_prefix_caching,
            cache_dtype=self.kv_cache_dtype,
        )
        return Engine.from_pretrained(
            self.model,
            backend=self.backend,
            scheduler_config=scheduler_config,
            cache_config=cache_config,
            kv_cache_gb=None if self.num_blocks else self.kv_cache_gb,
            quantization=self.quantization,
            tensor_parallel_size=self.tensor_parallel_size,
            compile_config=CompileConfig(artifact_cache=self.artifact_cache) if self.artifact_cache else None,
            kernels=self.kernels,
        )


ROUTINGS = ("prefix", "round_robin", "least_outstanding")


@dataclass
class ReplicaConfig:
    """How many replicas and what each one reserves on the Ray cluster.

    ``num_cpus``: CPU cores per replica (a Ray resource). ``num_neuron_cores``: NeuronCores per
    replica (Ray's ``neuron_cores`` resource on Inf2/Trn1 nodes; match the engine's TP degree).
    ``autoscaling``: ``None`` for a fixed ``num_replicas``, else Ray Serve's ``autoscaling_config``
    (see ``autoscale.autoscaling_config``). ``max_ongoing_requests``: a replica's admission limit
    beyond which Ray queues requests in the router (keep it at or below the engine's
    ``max_num_seqs + max_waiting``).
    """

    num_replicas: int = 2
    num_cpus: float = 1.0
    num_neuron_cores: int = 0
    max_ongoing_requests: int = 64
    routing: str = "prefix"  # prefix | round_robin | least_outstanding
    load_factor: float = 1.25
    autoscaling: dict | None = None
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    extra_resources: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas: must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0 or self.num_neuron_cores < 0:
            raise ValueError("num_cpus: resources per replica must be >= 0")
        if self.routing not in ROUTINGS:
            raise ValueError(
                f"routing: {self.routing!r} is not one of prefix, round_robin, least_outstanding"
            )

    def ray_actor_options(self) -> dict:
        resources = dict(self.extra_resources)
        if self.num_neuron_cores:
            resources["neuron_cores"] = self.num_neuron_cores
        return {"num_cpus": self.num_cpus, **({"resources": resources} if resources else {})}
