"""The scheduler library: paged KV blocks, prefix caching and continuous batching.

Pure Python (standard library only), so it imports and runs anywhere, without torch::

    from neuronserve.core import Scheduler, SchedulerConfig, CacheConfig, Request
"""

from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.core.block_manager import PAD_BLOCK_ID, BlockManager
from neuronserve.core.request import FinishReason, Request, RequestStatus
from neuronserve.core.scheduler import QueueFullError, Scheduler, SchedulerOutput, SchedulerStats

__all__ = [
    "PAD_BLOCK_ID",
    "BlockManager",
    "CacheConfig",
    "FinishReason",
    "QueueFullError",
    "Request",
    "RequestStatus",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
]
