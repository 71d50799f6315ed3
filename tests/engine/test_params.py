import pytest

from neuronserve import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": 1e9}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": "7"}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"max_markup_chars": 0}, "max_markup_chars"),
        ({"n": 2}, "n"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**kwargs)


def test_the_ends_of_each_range_are_accepted():
    low = SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=0, presence_penalty=-2, frequency_penalty=2)
    high = SamplingParams(temperature=2, top_p=1e-6, top_k=1, min_p=1, repetition_penalty=5, max_tokens=1)
    assert low.greedy and not high.greedy and high.truncates and high.has_penalties


def test_defaults_and_normalisation():
    p = SamplingParams(stop="END", temperature=0)
    assert p.greedy and p.stop_strings == ("END",) and p.stop_token_ids == []
    assert not p.has_penalties and not p.truncates
    assert SamplingParams(stop=["a", "b", "a"]).stop_strings == ("a", "b")
    assert SamplingParams(top_k=-1).top_k == -1 and not SamplingParams(top_k=-1).truncates
