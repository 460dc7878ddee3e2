import pytest

from raysal.data.tags import TagSyntaxError, format_tag, parse_caption


def spans_of(parsed):
    return [(parsed.text[s.start : s.end], s.segment_ids, s.syntax) for s in parsed.spans]


def test_colon_syntax_clean_text_and_spans():
    p = parse_caption("A <1: small grey cat> sits on <2,3: two cushions> near <4: the window>.")
    assert p.text == "A small grey cat sits on two cushions near the window."
    assert spans_of(p) == [
        ("small grey cat", (1,), "colon"),
        ("two cushions", (2, 3), "colon"),
        ("the window", (4,), "colon"),
    ]
    assert p.spans[0].start == 2 and p.spans[0].end == 16
    assert not p.malformed


def test_nocolon_syntax_is_zero_based_by_default():
    p = parse_caption("<0>a cat> on <1,2>two mats>")
    assert p.text == "a cat on two mats"
    assert spans_of(p) == [("a cat", (1,), "nocolon"), ("two mats", (2, 3), "nocolon")]


def test_mixed_syntaxes_keep_order_and_their_own_offsets():
    p = parse_caption("<3: a dog> and <0>a cat> and < 62,63 , 48 : some people>", colon_offset=1, nocolon_offset=5)
    assert spans_of(p) == [
        ("a dog", (4,), "colon"),
        ("a cat", (5,), "nocolon"),
        ("some people", (63, 64, 49), "colon"),
    ]
    assert p.text == "a dog and a cat and some people"


def test_offsets_are_per_syntax():
    raw = "<1: x> <1>y>"
    assert [s.segment_ids for s in parse_caption(raw, colon_offset=0, nocolon_offset=0).spans] == [(1,), (1,)]
    assert [s.segment_ids for s in parse_caption(raw, colon_offset=-1, nocolon_offset=2).spans] == [(0,), (3,)]


def test_spans_are_exact_under_unicode_and_whitespace():
    p = parse_caption("Ein  <5:  grüner Baum >  steht\tam <6: Fluss>.")
    assert p.text == "Ein  grüner Baum  steht\tam Fluss."
    assert spans_of(p) == [("grüner Baum", (5,), "colon"), ("Fluss", (6,), "colon")]


def test_malformed_fragments_are_reported_not_dropped():
    p = parse_caption("a <1: cat> and <2: dog")
    assert spans_of(p) == [("cat", (1,), "colon")]
    assert p.malformed == ("<2:",)
    assert parse_caption("<a: x>").malformed


def test_no_tags():
    p = parse_caption("just words.")
    assert p.text == "just words." and p.spans == () and p.malformed == ()


@pytest.mark.parametrize("syntax", ["colon", "nocolon"])
def test_format_tag_round_trips(syntax):
    raw = f"see {format_tag([2, 7], 'two dogs', syntax=syntax)} now"
    p = parse_caption(raw, colon_offset=0, nocolon_offset=0)
    assert spans_of(p) == [("two dogs", (2, 7), syntax)] and p.text == "see two dogs now"
    with pytest.raises(TagSyntaxError):
        format_tag([1], "x", syntax="square")
