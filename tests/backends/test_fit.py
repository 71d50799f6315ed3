"""The fit check from a config alone (no weights): Llama-3-8B in bf16 does not fit one Inf2
NeuronCore and does at TP 8 on inf2.24xlarge; the figures behind it are the published ones."""

import pytest

from neuronserve.hardware import GIB, check_fit, fit_report, weight_bytes_per_rank
from neuronserve.presets import param_count, preset


@pytest.mark.parametrize(
    ("name", "billions"),
    [("smollm2-135m", 0.1345), ("llama-3.2-1b", 1.236), ("llama-3-8b", 8.030), ("llama-3-70b", 70.554)],
)
def test_presets_have_the_published_parameter_counts(name, billions):
    assert param_count(preset(name)) / 1e9 == pytest.approx(billions, abs=5e-4)


def test_llama3_8b_bf16_on_one_inf2_core_is_refused_with_the_numbers():
    config = preset("llama-3-8b")
    with pytest.raises(ValueError) as info:
        check_fit(config, "inf2.xlarge", 1)
    message = str(info.value)
    assert message.startswith("tensor_parallel_size: inf2.xlarge at TP 1: each NeuronCore needs")
    assert "weights 14.96 GiB" in message and "of its 16.00 GiB HBM: does not fit: short by" in message


def test_llama3_8b_at_tp8_on_inf2_24xlarge_is_accepted():
    report = check_fit(preset("llama-3-8b"), "inf2.24xlarge", 8)
    assert report.fits and report.weights == pytest.approx(14.96 * GIB / 8, rel=0.01)


def test_padding_and_quantization_change_the_bytes_per_core():
    config = preset("llama-3-8b")
    # TP 24: 32 query heads padded to 48 and each KV head on 3 cores: more than 1/24 of TP 1
    assert weight_bytes_per_rank(config, 24) > weight_bytes_per_rank(config, 1) / 24
    assert weight_bytes_per_rank(config, 8, quantization="int8") < 0.6 * weight_bytes_per_rank(config, 8)
    assert fit_report(config, "inf2.48xlarge", 24, quantization="int8").fits


def test_a_degree_the_instance_cannot_hold_is_refused_first():
    with pytest.raises(ValueError, match="exceeds the 12 NeuronCores of inf2.24xlarge"):
        fit_report(preset("llama-3-8b"), "inf2.24xlarge", 24)
