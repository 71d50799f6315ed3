"""Stop strings and markup holding on scripted text, chunk by chunk."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from neuronserve.engine.text import TextStream


def cut_inside_tag(full: str, cut: int, bound: int) -> bool:
    """Whether cutting ``full`` at ``cut`` splits a tag: a ``<`` after the last ``>`` before the
    cut that is followed by a letter, ``/``, ``!`` or ``?`` (or by nothing yet), no longer than the
    bound allows."""
    for j in range(full.rfind(">", 0, cut) + 1, cut):
        after = full[j + 1 : j + 2]
        if full[j] == "<" and (after == "" or after.isalpha() or after in "/!?") and len(full) - j <= bound:
            return True
    return False


def feed(stream: TextStream, chunks: list[str]) -> list[str]:
    deltas = [stream.push(c) for c in chunks[:-1]] if chunks else []
    deltas.append(stream.push(chunks[-1] if chunks else "", final=True))
    return deltas


def test_a_stop_string_across_chunks_never_leaks():
    stream = TextStream(stop=["STOP"])
    deltas = feed(stream, ["Buy it", " now S", "T", "OP and more", " text"])
    assert deltas[:2] == ["Buy it", " now "]  # "S" is held: it may begin "STOP"
    assert "".join(deltas) == "Buy it now " and stream.stopped_by == "STOP"


def test_a_held_prefix_is_released_when_the_stop_string_does_not_form():
    stream = TextStream(stop=["STOP"])
    assert stream.push("a ST") == "a "
    assert stream.push("AR") == "STAR"


def test_markup_is_held_until_the_tag_closes():
    stream = TextStream(hold_markup=True)
    assert stream.push("Try <prod") == "Try "
    assert stream.push('uct id="B0C1') == ""
    assert stream.push('234567"/> or') == '<product id="B0C1234567"/> or'
    assert stream.push(" 2 < 3 ") == " 2 < 3 "  # a lone "<" is text, not a tag
    assert stream.push("<b>x <i") == "<b>x "
    assert stream.push("mg <a") == ""  # held from the first open tag, not the last
    assert stream.push(">") == "<img <a>"


def test_an_overlong_tag_is_released_as_text():
    stream = TextStream(hold_markup=True, max_markup_chars=8)
    assert stream.push("x <abc") == "x "
    assert stream.push("defghijk") == "<abcdefghijk"


text_alphabet = st.sampled_from(list("ab <>/XY\n"))


@example(text="<b<", cuts=[2], stops=["b", "<b<"], hold=False, bound=1)  # overlapping stop strings
@settings(max_examples=300, deadline=None)
@given(
    text=st.text(text_alphabet, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=12),
    stops=st.lists(st.text(st.sampled_from(list("abXY<")), min_size=1, max_size=4), max_size=3),
    hold=st.booleans(),
    bound=st.integers(1, 12),
)
def test_deltas_form_the_final_text_and_never_end_inside_a_tag(text, cuts, stops, hold, bound):
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    stream = TextStream(stop=stops, hold_markup=hold, max_markup_chars=bound)
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) != -1]  # the first to complete wins
    expected = text[: min(hits)[1]] if hits else text

    released = ""
    for i, chunk in enumerate(chunks):
        final = i == len(chunks) - 1
        released += stream.push(chunk, final=final)
        assert expected.startswith(released)  # nothing past a stop string, text never altered
        if hold and not final and stream.stopped_by is None:
            assert not cut_inside_tag(stream.text, len(released), bound), (stream.text, released)
    if not chunks:
        released += stream.push("", final=True)
    assert released == expected
