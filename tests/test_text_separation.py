"""research/text_separation.py: one-word minimal pairs by attribute family, and their mean cosine."""

import torch

from research.text_separation import minimal_pairs, separation

TEXTS = ["the red circle", "the blue circle", "the red square", "the red disc", "the big star",
         "the small star", "the little star", "the leftmost hexagon", "the rightmost hexagon",
         "the red one left of the star", "the blue circle"]


def test_minimal_pairs_differ_by_one_value_of_one_family():
    pairs = minimal_pairs(TEXTS)
    got = {(frozenset((a, b)), family) for a, b, family in pairs.itertuples(index=False)}
    assert (frozenset(("the red circle", "the blue circle")), "colour") in got
    assert (frozenset(("the red circle", "the red square")), "shape") in got
    assert (frozenset(("the big star", "the small star")), "size") in got
    assert (frozenset(("the leftmost hexagon", "the rightmost hexagon")), "position") in got
    # synonyms are one value ("circle"/"disc", "small"/"little"); a duplicate text is one text
    assert all(frozenset(("the red circle", "the red disc")) != p for p, _ in got)
    assert all(frozenset(("the small star", "the little star")) != p for p, _ in got)
    assert len(pairs) == len(got)
    # "the red disc" / "the red square" differ in one shape word too
    assert set(pairs["family"]) == {"colour", "shape", "size", "position"}


def test_separation_sees_a_text_encoder_blind_to_one_family():
    """An encoder that reads only colour words maps shape pairs to one vector (cosine 1) and keeps colour
    pairs apart."""
    colours = {"red": 0, "blue": 1}

    def embed(texts):
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            hit = [colours[w] for w in t.split() if w in colours]
            out[i, hit[0] if hit else 3] = 1.0
            out[i, 2] = 0.1
        return out

    result = separation(embed, minimal_pairs(TEXTS), TEXTS, random_pairs=50)
    assert result["shape"][0] > 0.999
    assert result["colour"][0] < 0.1
    assert 0 < result["random"][1] <= 50


def test_a_relation_direction_is_not_a_position():
    texts = ["the one left of the star", "the one right of the star", "the one above the star",
             "the one under the star", "the one below the star", "the left star", "the right star"]
    got = {(frozenset((a, b)), f) for a, b, f in minimal_pairs(texts).itertuples(index=False)}
    assert (frozenset(("the one left of the star", "the one right of the star")), "relation") in got
    assert (frozenset(("the one above the star", "the one under the star")), "relation") in got
    assert (frozenset(("the left star", "the right star")), "position") in got
    assert all(p != frozenset(("the one under the star", "the one below the star")) for p, _ in got)
    # "left of" and "above" are both directions: "the one left of the star" / "the one above the star"
    # differ in two words, so they are no pair
    assert len(got) == 4
