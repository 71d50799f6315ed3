import sys

import pytest
import torch

from neuronserve.backends.cpu import CPUModelRunner
from neuronserve.backends.hugepages import HUGE_PAGE, huge_page_zeros, transparent_huge_pages
from neuronserve.config import CacheConfig, SchedulerConfig
from tests.model.conftest import make_pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float8_e4m3fn], ids=str)
def test_huge_page_zeros_is_an_aligned_zeroed_contiguous_tensor(dtype):
    shape = (2, 70, 3, 16, 64)  # 860,160 elements: over 2 MB as fp32, under it as a byte type
    t = huge_page_zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert not t.view(torch.uint8).any()
    if sys.platform.startswith("linux") and t.numel() * t.element_size() >= HUGE_PAGE:
        assert t.data_ptr() % HUGE_PAGE == 0
    # Writes land in the tensor's own bytes: the rest of the buffer stays untouched.
    t.view(torch.uint8).fill_(7)
    assert int(t.view(torch.uint8).sum()) == 7 * t.numel() * t.element_size()


def test_small_tensors_are_plain_zeros():
    t = huge_page_zeros((4, 8), torch.float32)
    assert torch.equal(t, torch.zeros(4, 8)) and t.storage_offset() == 0


def test_the_setting_is_reported():
    assert transparent_huge_pages() in ("always", "madvise", "never", "unknown")


def test_the_cpu_runner_cache_is_huge_page_aligned():
    _, model = make_pair("gqa-9-3-llama3")
    cache = CacheConfig(block_size=16, num_blocks=2048)  # 3 layers x 2 x 2048 x 3 x 16 x 16 fp32: 18.9 MB
    runner = CPUModelRunner(model, model.config, cache, SchedulerConfig())
    assert not runner.kv_cache.any()
    if sys.platform.startswith("linux") and runner.kv_cache_bytes >= HUGE_PAGE:
        assert runner.kv_cache.data_ptr() % HUGE_PAGE == 0
