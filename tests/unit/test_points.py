"""Points: KJNodes / SAM2 coordinate strings, per-image lists, widget state, JSON round trip."""
from __future__ import annotations

import json

import pytest

from p3s_core.errors import P3SError, PointsError
from p3s_core.points import (
    P3S_POINTS_TYPE,
    ImagePoints,
    P3SPoints,
    format_coordinates,
    parse_coordinates,
    points_from_strings,
)

W, H = 320, 200


# ------------------------------------------------------------------ parse_coordinates: formats
@pytest.mark.parametrize("text", ["", "   ", "\n\t", "[]", "null", " [ ] "])
def test_empty_inputs_give_no_points(text):
    assert parse_coordinates(text, W, H, "coordinates_positive") == []


def test_kjnodes_format_ints():
    pts = parse_coordinates('[{"x": 312, "y": 105}, {"x": 0, "y": 0}]', W, H, "c")
    assert pts == [(312.0, 105.0), (0.0, 0.0)]
    assert all(isinstance(v, float) for p in pts for v in p)


def test_floats_in_pixels_and_extra_keys():
    pts = parse_coordinates('[{"x": 12.5, "y": 99.25, "label": 1}]', W, H, "c")
    assert pts == [(12.5, 99.25)]


def test_single_quotes_like_sam2():
    assert parse_coordinates("[{'x': 10, 'y': 20}]", W, H, "c") == [(10.0, 20.0)]


def test_single_dict_not_in_list():
    assert parse_coordinates('{"x": 7, "y": 8}', W, H, "c") == [(7.0, 8.0)]


def test_list_of_pairs_and_single_pair():
    assert parse_coordinates("[[1, 2], [30.5, 40]]", W, H, "c") == [(1.0, 2.0), (30.5, 40.0)]
    assert parse_coordinates("[5, 6]", W, H, "c") == [(5.0, 6.0)]


def test_single_per_image_list_is_one_image():
    assert parse_coordinates('[[{"x": 3, "y": 4}]]', W, H, "c") == [(3.0, 4.0)]


def test_normalised_coordinates_are_scaled():
    pts = parse_coordinates('[{"x": 0.5, "y": 0.25}, {"x": 1, "y": 0}]', W, H, "c")
    assert pts == [(0.5 * W, 0.25 * H), (1.0 * W, 0.0)]


def test_integer_zero_one_points_are_pixels():
    # all numbers in [0, 1] but all whole: pixels, not normalised
    assert parse_coordinates('[{"x": 0, "y": 0}, {"x": 1, "y": 1}]', W, H, "c") == [(0.0, 0.0), (1.0, 1.0)]
    assert parse_coordinates('[{"x": 1.0, "y": 0.0}]', W, H, "c") == [(1.0, 0.0)]


def test_mixed_range_is_pixels():
    # 0.5 alone would be normalised, but 150 is not in [0, 1]: the whole string is pixels
    assert parse_coordinates('[{"x": 0.5, "y": 150}]', W, H, "c") == [(0.5, 150.0)]


def test_edge_points_inclusive_bound():
    assert parse_coordinates(f'[{{"x": {W}, "y": {H}}}]', W, H, "c") == [(float(W), float(H))]


# ------------------------------------------------------------------ parse_coordinates: errors
@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[{"x": 1, "y": 2}', "not valid JSON"),
        ("hello", "not valid JSON"),
        ('[{"x": 1}]', "'y'"),
        ('[{"y": 1}]', "'x'"),
        ('[{"x": "a", "y": 2}]', "not a number"),
        ('[{"x": true, "y": 2}]', "not a number"),
        ('[{"x": null, "y": 2}]', "not a number"),
        ('[{"x": NaN, "y": 2}]', "not finite"),
        ('[{"x": Infinity, "y": 2}]', "not finite"),
        ('[{"x": 1e999, "y": 2}]', "not finite"),
        ('[{"x": -1, "y": 2}]', "outside"),
        (f'[{{"x": {W + 1}, "y": 2}}]', "outside"),
        (f'[{{"x": 3, "y": {H + 0.5}}}]', "outside"),
        ("[1, 2, 3]", "not a point"),
        ('"abc"', "expected a list"),
        ("42", "expected a list"),
        ("[[1, 2, 3]]", "not a point"),
        ('[[{"x": 1, "y": 1}], [{"x": 2, "y": 2}]]', "per-image"),
        ('[{"x": 1, "y": 1}, [{"x": 2, "y": 2}], 5]', "not a point"),
    ],
)
def test_parse_errors_name_the_input(text, fragment):
    with pytest.raises(PointsError) as ei:
        parse_coordinates(text, W, H, "coordinates_negative")
    msg = str(ei.value)
    assert "coordinates_negative" in msg
    assert fragment in msg
    assert "Fix:" in msg
    assert isinstance(ei.value, P3SError) and isinstance(ei.value, ValueError)


def test_outside_message_gives_size_and_fix():
    with pytest.raises(PointsError) as ei:
        parse_coordinates('[{"x": 400, "y": 10}]', W, H, "coordinates_positive")
    msg = str(ei.value)
    assert "320x200" in msg and "0 <= x <= 320" in msg


def test_normalised_out_of_image_is_impossible_but_negative_is_error():
    with pytest.raises(PointsError, match="outside"):
        parse_coordinates('[{"x": -0.5, "y": 0.5}]', W, H, "c")


def test_non_string_input_is_points_error():
    with pytest.raises(PointsError, match="c"):
        parse_coordinates(12, W, H, "c")  # type: ignore[arg-type]


def test_bad_size_is_points_error():
    with pytest.raises(PointsError, match="width"):
        parse_coordinates("[]", 0, H, "c")


# ------------------------------------------------------------------ format_coordinates
def test_format_round_trips_and_rounds_to_ints():
    s = format_coordinates([(312.4, 205.6), (0.0, 199.0)])
    assert json.loads(s) == [{"x": 312, "y": 206}, {"x": 0, "y": 199}]
    assert all(isinstance(v, int) for d in json.loads(s) for v in d.values())
    assert parse_coordinates(s, W + 100, H + 100, "c") == [(312.0, 206.0), (0.0, 199.0)]
    assert format_coordinates([]) == "[]"


# ------------------------------------------------------------------ points_from_strings
def test_flat_list_applies_to_every_image():
    p = points_from_strings('[{"x": 10, "y": 20}]', '[{"x": 100, "y": 50}]', W, H, 3)
    assert len(p) == 3 and (p.width, p.height) == (W, H)
    for i in range(3):
        assert p.for_image(i) == ImagePoints([(10.0, 20.0)], [(100.0, 50.0)])
    # independent lists, not aliases
    p.images[0].positive.append((1.0, 1.0))
    assert p.images[1].positive == [(10.0, 20.0)]


def test_numpy_sizes_accepted():
    import numpy as np

    p = points_from_strings('[{"x": 1, "y": 2}]', "", np.int64(W), np.int64(H), np.int64(2))
    assert len(p) == 2 and (p.width, p.height) == (W, H) and type(p.width) is int


def test_per_image_lists():
    pos = '[[{"x": 1, "y": 2}], [{"x": 3, "y": 4}, {"x": 5, "y": 6}]]'
    neg = '[[], [[7, 8]]]'
    p = points_from_strings(pos, neg, W, H, 2)
    assert p.images[0] == ImagePoints([(1.0, 2.0)], [])
    assert p.images[1] == ImagePoints([(3.0, 4.0), (5.0, 6.0)], [(7.0, 8.0)])


def test_per_image_length_mismatch():
    with pytest.raises(PointsError) as ei:
        points_from_strings('[[{"x": 1, "y": 2}], [{"x": 3, "y": 4}]]', "", W, H, 3)
    assert "coordinates_positive" in str(ei.value) and "3" in str(ei.value)


def test_no_positive_point_on_an_image():
    with pytest.raises(PointsError, match="no positive point on image 1"):
        points_from_strings('[[{"x": 1, "y": 2}], []]', "", W, H, 2)
    with pytest.raises(PointsError, match="no positive point on image 0"):
        points_from_strings("", '[{"x": 1, "y": 2}]', W, H, 1)


def test_negative_string_errors_name_negative_input():
    with pytest.raises(PointsError, match="coordinates_negative"):
        points_from_strings('[{"x": 1, "y": 2}]', '[{"x": 999, "y": 2}]', W, H, 1)


def test_normalised_rule_over_whole_per_image_string():
    p = points_from_strings('[[{"x": 0.5, "y": 0.5}], [{"x": 1, "y": 1}]]', "", W, H, 2)
    assert p.images[0].positive == [(0.5 * W, 0.5 * H)]
    assert p.images[1].positive == [(float(W), float(H))]


# ------------------------------------------------------------------ P3SPoints
def test_json_round_trip_exact():
    p = P3SPoints([ImagePoints([(1.5, 2.25)], [(3.0, 4.0)]), ImagePoints([(0.0, 199.5)], [])], W, H)
    d = p.to_json()
    json.dumps(d)  # plain JSON
    assert d["width"] == W and d["height"] == H and len(d["images"]) == 2
    q = P3SPoints.from_json(d)
    assert q == p
    assert P3SPoints.from_json(json.dumps(d)) == p
    assert P3S_POINTS_TYPE == "P3S_POINTS"


def test_from_json_rejects_bad_input():
    with pytest.raises(PointsError, match="points"):
        P3SPoints.from_json({"images": []})
    with pytest.raises(PointsError, match="outside"):
        P3SPoints.from_json({"width": 10, "height": 10, "images": [{"positive": [[11, 1]]}]})
    with pytest.raises(PointsError, match="newer"):
        P3SPoints.from_json({"version": 99, "width": 10, "height": 10, "images": []})
    with pytest.raises(PointsError, match="malformed"):
        P3SPoints.from_json("{")


def test_for_image_bounds_and_broadcast():
    p = P3SPoints([ImagePoints([(1.0, 1.0)], [])], W, H)
    assert p.for_image(5) is p.images[0]
    q = P3SPoints([ImagePoints([(1.0, 1.0)]), ImagePoints([(2.0, 2.0)])], W, H)
    assert q.for_image(1).positive == [(2.0, 2.0)]
    with pytest.raises(PointsError, match="image 2"):
        q.for_image(2)


def test_rescaled_and_coordinate_strings():
    p = P3SPoints([ImagePoints([(100.0, 50.0)], [(10.0, 20.0)])], 200, 100)
    r = p.rescaled(400, 50)
    assert r.images[0].positive == [(200.0, 25.0)] and r.images[0].negative == [(20.0, 10.0)]
    pos, neg = p.to_coordinate_strings(0)
    assert json.loads(pos) == [{"x": 100, "y": 50}] and json.loads(neg) == [{"x": 10, "y": 20}]


# ------------------------------------------------------------------ widget state
def test_widget_state_same_size():
    state = {"images": [{"positive": [[10, 20]], "negative": [[30, 40]]},
                        {"positive": [{"x": 5, "y": 6}], "negative": []}], "width": W, "height": H}
    p = P3SPoints.from_widget_state(state, W, H, 2)
    assert p.images[0] == ImagePoints([(10.0, 20.0)], [(30.0, 40.0)])
    assert p.images[1] == ImagePoints([(5.0, 6.0)], [])
    # the JSON text form and to_json output are read the same way
    assert P3SPoints.from_widget_state(json.dumps(state), W, H, 2) == p
    assert P3SPoints.from_widget_state(p.to_json(), W, H, 2) == p


def test_widget_state_rescales_to_actual_size():
    state = {"images": [{"positive": [[100, 50]], "negative": [[200, 100]]}], "width": 200, "height": 100}
    p = P3SPoints.from_widget_state(state, 400, 300, 1)
    assert p.images[0].positive == [(200.0, 150.0)]
    assert p.images[0].negative == [(400.0, 300.0)]
    assert (p.width, p.height) == (400, 300)


def test_widget_state_single_entry_broadcasts():
    state = {"images": [{"positive": [[1, 2]]}]}
    p = P3SPoints.from_widget_state(state, W, H, 3)
    assert len(p) == 3 and all(im.positive == [(1.0, 2.0)] for im in p.images)


def test_widget_state_errors():
    with pytest.raises(PointsError, match="no positive point on image 1"):
        P3SPoints.from_widget_state({"images": [{"positive": [[1, 2]]}, {"negative": [[1, 1]]}]}, W, H, 2)
    with pytest.raises(PointsError, match="no positive point on image 2"):
        P3SPoints.from_widget_state({"images": [{"positive": [[1, 2]]}, {"positive": [[1, 1]]}]}, W, H, 3)
    with pytest.raises(PointsError, match="no positive point on image 0"):
        P3SPoints.from_widget_state("", W, H, 1)
    with pytest.raises(PointsError, match="3 images but the image batch has 2"):
        P3SPoints.from_widget_state({"images": [{"positive": [[1, 2]]}] * 3}, W, H, 2)
    with pytest.raises(PointsError, match="outside"):
        P3SPoints.from_widget_state({"images": [{"positive": [[W + 5, 2]]}]}, W, H, 1)
    with pytest.raises(PointsError, match="not valid JSON"):
        P3SPoints.from_widget_state("{oops", W, H, 1)
    with pytest.raises(PointsError, match="'y'"):
        P3SPoints.from_widget_state({"images": [{"positive": [{"x": 1}]}]}, W, H, 1)
    with pytest.raises(PointsError, match="stored width"):
        P3SPoints.from_widget_state({"images": [], "width": 0, "height": 5}, W, H, 1)
    with pytest.raises(PointsError, match="my_state"):
        P3SPoints.from_widget_state({"images": "x"}, W, H, 1, input_name="my_state")


# ------------------------------------------------------------------ sizes: refused before the work
def test_point_count_limit_serves_real_use_and_refuses_floods():
    from p3s_core.points import MAX_POINTS_PER_IMAGE

    ok = json.dumps([{"x": i % W, "y": i % H} for i in range(MAX_POINTS_PER_IMAGE)])
    assert len(parse_coordinates(ok, W, H, "c")) == MAX_POINTS_PER_IMAGE
    one_more = json.dumps([{"x": 1, "y": 1}] * (MAX_POINTS_PER_IMAGE + 1))
    with pytest.raises(PointsError, match=rf"{MAX_POINTS_PER_IMAGE + 1} points for each image") as ei:
        points_from_strings(one_more, "", W, H, 2)
    assert ei.value.input_name == "coordinates_positive"
    with pytest.raises(PointsError, match="points for image 0 .negative.") as ei:
        P3SPoints.from_widget_state({"images": [{"positive": [[1, 1]], "negative": [[2, 2]] * 101}]}, W, H, 1,
                                    input_name="points_store")


def test_a_million_points_are_refused_from_the_text_length_before_parsing(monkeypatch):
    from p3s_core import points as points_mod

    text = json.dumps([{"x": 1, "y": 1}] * 1_000_000)
    parsed = []
    real_loads = points_mod.json.loads
    monkeypatch.setattr(points_mod.json, "loads", lambda s, *a, **k: parsed.append(1) or real_loads(s, *a, **k))
    with pytest.raises(PointsError, match=r"characters long \(at most 200,000\)") as ei:
        points_from_strings(text, "", W, H, 1)
    assert parsed == [], "the text was parsed before it was refused"
    assert "at most 100 points per image" in ei.value.fix
    with pytest.raises(PointsError, match="characters long"):
        P3SPoints.from_widget_state(text, W, H, 1, input_name="points_store")
    assert parsed == []


def test_too_many_per_image_lists_are_refused():
    from p3s_core.points import MAX_IMAGES

    many = json.dumps([[{"x": 1, "y": 1}]] * (MAX_IMAGES + 1))
    with pytest.raises(PointsError, match=rf"points for {MAX_IMAGES + 1} images \(at most {MAX_IMAGES}\)"):
        points_from_strings(many, "", W, H, MAX_IMAGES + 1)
    state = {"images": [{"positive": [[1, 1]]}] * (MAX_IMAGES + 1)}
    with pytest.raises(PointsError, match=rf"points for {MAX_IMAGES + 1} images"):
        P3SPoints.from_widget_state(state, W, H, MAX_IMAGES + 1, input_name="points_store")
