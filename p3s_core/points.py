"""Clicked points of the reference images (the ``p`` of paper Sec. III-A, Eq. 1).

A user marks the subject with *positive* points and a look-alike distractor with *negative* points,
per image of the reference batch. This module holds those points (:class:`ImagePoints`,
:class:`P3SPoints`, passed between nodes as the ComfyUI type ``"P3S_POINTS"``) and reads / writes
the coordinate strings of the KJNodes Points Editor and the SAM2 nodes, so one set of clicks feeds
both packs.

Coordinate convention (decided here, used everywhere in the pack)
-----------------------------------------------------------------
Points are ``(x, y)`` floats in **pixels of the reference image**, x to the right, y down, origin at
the top-left corner of the image. The image covers the *closed* rectangle ``0 <= x <= width``,
``0 <= y <= height``: a point exactly on the right / bottom edge (which a canvas click or a
normalised ``1.0`` produces) is accepted and treated as lying in the last pixel column / row by
the patch mapping (:meth:`p3s_core.rngr.Letterbox.image_to_patch`). Anything outside is an error,
never silently dropped or clamped.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .errors import PointsError

__all__ = [
    "P3S_POINTS_TYPE",
    "ImagePoints",
    "P3SPoints",
    "parse_coordinates",
    "format_coordinates",
    "points_from_strings",
    "MAX_POINTS_PER_IMAGE",
    "MAX_TEXT_CHARS",
    "MAX_IMAGES",
]

#: The ComfyUI socket type name of :class:`P3SPoints`.
P3S_POINTS_TYPE = "P3S_POINTS"

#: Limits that serve real use (a few clicks per image; SAM2 / KJNodes strings of tens of points)
#: while refusing, before any parsing, inputs whose work would explode (1,000,000 points once took
#: 108 s to draw). Each is a row of docs/ERRORS.md.
MAX_POINTS_PER_IMAGE = 100    # positive points of one image; the same for its negative points
MAX_TEXT_CHARS = 200_000      # a coordinate string or the widget state (100 points ~ 3,000 chars)
MAX_IMAGES = 64               # per-image lists / widget images (the IMAGE batch cap too)

#: Version of the plain-JSON layout written by :meth:`P3SPoints.to_json`.
POINTS_JSON_VERSION = 1

Point = tuple[float, float]


@dataclass
class ImagePoints:
    """Positive (subject) and negative (distractor) points of ONE image, pixel ``(x, y)``."""

    positive: list[Point] = field(default_factory=list)
    negative: list[Point] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "positive": [[float(x), float(y)] for x, y in self.positive],
            "negative": [[float(x), float(y)] for x, y in self.negative],
        }

    def scaled(self, sx: float, sy: float) -> "ImagePoints":
        """The same points with x multiplied by ``sx`` and y by ``sy``."""
        return ImagePoints(
            positive=[(x * sx, y * sy) for x, y in self.positive],
            negative=[(x * sx, y * sy) for x, y in self.negative],
        )


@dataclass
class P3SPoints:
    """The points of a reference batch: ``images[i]`` holds the points of image ``i``.

    Coordinates are pixels of an image of ``width`` x ``height`` (the size the points were
    clicked on). A ``P3SPoints`` with a single entry applies to every image of a batch (see
    :meth:`for_image`), like a flat coordinate string does.
    """

    images: list[ImagePoints]
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.images)

    def for_image(self, i: int, input_name: str = "points") -> ImagePoints:
        """Points of image ``i``. A single-entry ``P3SPoints`` is shared by every image."""
        if len(self.images) == 1 and i >= 0:
            return self.images[0]
        if not 0 <= i < len(self.images):
            raise PointsError(
                input_name,
                f"points are given for {len(self.images)} image(s) but image {i} was asked for",
                "give points for every image of the batch (or one set of points for all of them), "
                "and connect the same image batch the points were clicked on",
            )
        return self.images[i]

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        """Plain JSON-able dict; :meth:`from_json` reads it back exactly.

        Layout (also the widget state layout read by :meth:`from_widget_state`)::

            {"version": 1, "width": W, "height": H,
             "images": [{"positive": [[x, y], ...], "negative": [[x, y], ...]}, ...]}
        """
        return {
            "version": POINTS_JSON_VERSION,
            "width": int(self.width),
            "height": int(self.height),
            "images": [im.to_json() for im in self.images],
        }

    @classmethod
    def from_json(cls, data: dict | str, input_name: str = "points") -> "P3SPoints":
        """Inverse of :meth:`to_json` (accepts the dict or its JSON text). Validates bounds."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as exc:
                raise PointsError(input_name, f"the points JSON is malformed ({exc})",
                                  "pass the text written by P3SPoints.to_json") from None
        if not isinstance(data, dict):
            raise PointsError(input_name, f"expected a JSON object, got {type(data).__name__}",
                              "pass the dict written by P3SPoints.to_json")
        width, height = _size_from(data, input_name)
        if width is None or height is None:
            raise PointsError(input_name, "the points JSON has no 'width' / 'height'",
                              "pass the dict written by P3SPoints.to_json")
        version = data.get("version", POINTS_JSON_VERSION)
        if not isinstance(version, int) or version > POINTS_JSON_VERSION:
            raise PointsError(input_name, f"points format version {version!r} is newer than this "
                              f"pack understands ({POINTS_JSON_VERSION})", "update the P3S pack")
        images = _images_from_state(data, input_name)
        for i, im in enumerate(images):
            _check_bounds(im.positive, width, height, f"{input_name}[{i}].positive")
            _check_bounds(im.negative, width, height, f"{input_name}[{i}].negative")
        return cls(images=images, width=width, height=height)

    @classmethod
    def from_widget_state(cls, state: dict | str, width: int, height: int, batch: int,
                          input_name: str = "points_state") -> "P3SPoints":
        """Points from the Point Selector widget's hidden JSON state, for a batch of ``batch``.

        ``state`` is ``{"images": [{"positive": [[x, y], ...], "negative": [...]}, ...],
        "width": W, "height": H}`` in pixels of a ``W`` x ``H`` image (``{"x": .., "y": ..}``
        dicts are accepted for points too). If ``W`` / ``H`` differ from the actual ``width`` /
        ``height`` the points are rescaled per axis (``x * width / W``, ``y * height / H``); a
        missing ``W`` / ``H`` means the actual size. ``images[i]`` belongs to image ``i``;
        a single entry applies to every image. Every image needs >= 1 positive point, and the
        state may not list more images than the batch has.
        """
        _check_size(width, height, batch, input_name)
        if isinstance(state, str):
            if not state.strip():
                state = {}
            else:
                _check_text_size(state, input_name, "click the points again in the P3S Point Selector "
                                 f"(at most {MAX_POINTS_PER_IMAGE} points per image)")
                try:
                    state = json.loads(state)
                except (ValueError, RecursionError) as exc:
                    raise PointsError(input_name, f"the widget state is not valid JSON ({exc})",
                                      "click the points again in the P3S Point Selector") from None
        if state is None:
            state = {}
        if not isinstance(state, dict):
            raise PointsError(input_name, f"the widget state must be a JSON object, got "
                              f"{type(state).__name__}", "click the points again in the P3S Point Selector")
        sw, sh = _size_from(state, input_name)
        sw = width if sw is None else sw
        sh = height if sh is None else sh
        images = _images_from_state(state, input_name)
        if len(images) > batch:
            raise PointsError(
                input_name,
                f"the widget holds points for {len(images)} images but the image batch has {batch}",
                "connect the image batch the points were clicked on, or clear the points of the "
                "extra images in the P3S Point Selector",
            )
        if sw != width or sh != height:
            images = [im.scaled(width / sw, height / sh) for im in images]
        if len(images) == 1 and batch > 1:
            images = [ImagePoints(list(images[0].positive), list(images[0].negative))
                      for _ in range(batch)]
        while len(images) < batch:
            images.append(ImagePoints())
        for i, im in enumerate(images):
            _check_bounds(im.positive, width, height, f"{input_name} (image {i}, positive)")
            _check_bounds(im.negative, width, height, f"{input_name} (image {i}, negative)")
        pts = cls(images=images, width=int(width), height=int(height))
        pts.validate(input_name)
        return pts

    # ------------------------------------------------------------- helpers
    def validate(self, input_name: str = "points") -> None:
        """Raise :class:`PointsError` unless every image has at least one positive point."""
        for i, im in enumerate(self.images):
            if not im.positive:
                raise PointsError(
                    input_name,
                    f"no positive point on image {i} (of {len(self.images)})",
                    "click at least one positive point on the subject in every reference image",
                )

    def rescaled(self, width: int, height: int) -> "P3SPoints":
        """The same points in pixels of a ``width`` x ``height`` image (per-axis scaling)."""
        sx, sy = width / self.width, height / self.height
        return P3SPoints([im.scaled(sx, sy) for im in self.images], int(width), int(height))

    def to_coordinate_strings(self, i: int = 0) -> tuple[str, str]:
        """``(coordinates_positive, coordinates_negative)`` of image ``i`` for SAM2 / KJNodes."""
        im = self.for_image(i)
        return format_coordinates(im.positive), format_coordinates(im.negative)


# ---------------------------------------------------------------------------- parsing
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _load(text: Any, input_name: str) -> Any:
    """Parse ``text`` as JSON; on failure retry with single quotes turned into double quotes
    (what the SAM2 nodes do). Empty / whitespace-only text is ``[]``."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise PointsError(input_name, f"expected a text of coordinates, got {type(text).__name__}",
                          'give JSON like [{"x": 312, "y": 205}]')
    _check_text_size(text, input_name, f"give at most {MAX_POINTS_PER_IMAGE} points per image "
                     '(e.g. [{"x": 312, "y": 205}]); thin out the points of the node that made them')
    s = text.strip()
    if not s:
        return []
    last_exc: Exception | None = None
    for candidate in (s, s.replace("'", '"')):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            last_exc = exc
    short = s if len(s) <= 60 else s[:57] + "..."
    raise PointsError(
        input_name,
        f"the coordinates are not valid JSON ({type(last_exc).__name__}: {last_exc}); got {short!r}",
        'write the points as JSON like [{"x": 312, "y": 205}] (pixel coordinates) or '
        "connect the coordinates output of the KJNodes Points Editor",
    )


def _check_text_size(text: str, input_name: str, fix: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise PointsError(input_name, f"the text is {len(text):,} characters long (at most "
                          f"{MAX_TEXT_CHARS:,})", fix)


def _check_count(n_points: int, input_name: str, where: str) -> None:
    if n_points > MAX_POINTS_PER_IMAGE:
        raise PointsError(input_name, f"{n_points:,} points for {where} (at most "
                          f"{MAX_POINTS_PER_IMAGE} positive and {MAX_POINTS_PER_IMAGE} negative per image)",
                          f"give at most {MAX_POINTS_PER_IMAGE} points per image: a few on the subject "
                          "and one or two on the distractor are enough")


def _check_image_count(n: int, input_name: str) -> None:
    if n > MAX_IMAGES:
        raise PointsError(input_name, f"points for {n:,} images (at most {MAX_IMAGES})",
                          f"use at most {MAX_IMAGES} reference images")


def _is_pair(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(c) for c in v)


def _is_point_like(v: Any) -> bool:
    return isinstance(v, dict) or _is_pair(v)


def _raw_point(v: Any, input_name: str, where: str) -> tuple[Any, Any]:
    """Return the raw (x, y) values of one point entry (a dict with x / y or an [x, y] pair)."""
    if isinstance(v, dict):
        missing = [k for k in ("x", "y") if k not in v]
        if missing:
            raise PointsError(
                input_name,
                f"point {where} has no {' / '.join(repr(k) for k in missing)} key (got keys "
                f"{sorted(map(str, v.keys()))})",
                'write each point as {"x": <pixels>, "y": <pixels>}',
            )
        return v["x"], v["y"]
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise PointsError(input_name, f"point {where} is a list of {len(v)} values, not [x, y]",
                              'write each point as {"x": <pixels>, "y": <pixels>} or [x, y]')
        return v[0], v[1]
    raise PointsError(input_name, f"point {where} is a {type(v).__name__} ({v!r:.40}), not a point",
                      'write each point as {"x": <pixels>, "y": <pixels>} or [x, y]')


def _number(v: Any, input_name: str, where: str, axis: str) -> float:
    if not _is_number(v):
        raise PointsError(input_name, f"{axis} of point {where} is not a number ({v!r:.40})",
                          "give pixel coordinates as plain numbers, e.g. 312 or 312.5")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise PointsError(input_name, f"{axis} of point {where} is {v!r:.40} (not finite)",
                          "give finite pixel coordinates inside the image")
    return f


def _structure(obj: Any, input_name: str) -> tuple[bool, list]:
    """Classify a parsed JSON value.

    Returns ``(per_image, lists)``: ``per_image`` False -> ``lists`` is ``[flat_point_list]``;
    True -> ``lists`` has one point list per image (a list of lists of points).
    """
    if obj is None:
        return False, [[]]
    if isinstance(obj, dict):
        return False, [[obj]]
    if not isinstance(obj, list):
        raise PointsError(input_name, f"expected a list of points, got {type(obj).__name__} ({obj!r:.40})",
                          'write the points as JSON like [{"x": 312, "y": 205}]')
    if not obj:
        return False, [[]]
    if _is_pair(obj):
        # a single bare [x, y] pair
        return False, [[obj]]
    if all(_is_point_like(v) for v in obj):
        return False, [obj]
    if all(isinstance(v, list) and all(_is_point_like(p) for p in v) for v in obj):
        return True, list(obj)
    # mixed or malformed: report the first offending entry
    for k, v in enumerate(obj):
        if not _is_point_like(v) and not (isinstance(v, list) and all(_is_point_like(p) for p in v)):
            raise PointsError(
                input_name,
                f"entry {k} is not a point ({v!r:.60})",
                'write the points as [{"x": 312, "y": 205}, ...] (or one such list per image: '
                "[[...], [...]])",
            )
    raise PointsError(input_name, "points and per-image lists are mixed in one list",
                      "use either a flat list of points (applies to every image) or one list per image")


def _convert(lists: list[list], width: int, height: int, input_name: str,
             per_image: bool) -> list[list[Point]]:
    """Turn raw point lists into floats, apply the normalised-coordinate rule, check bounds."""
    _check_image_count(len(lists), input_name)
    for i, pts in enumerate(lists):
        _check_count(len(pts), input_name, f"image {i}" if per_image else "each image")
    raw: list[list[tuple[float, float]]] = []
    for i, pts in enumerate(lists):
        cur = []
        for k, v in enumerate(pts):
            where = f"{k} of image {i}" if per_image else f"{k}"
            rx, ry = _raw_point(v, input_name, where)
            cur.append((_number(rx, input_name, where, "x"), _number(ry, input_name, where, "y")))
        raw.append(cur)
    values = [c for pts in raw for p in pts for c in p]
    normalised = (bool(values) and all(0.0 <= c <= 1.0 for c in values)
                  and any(not float(c).is_integer() for c in values))
    out: list[list[Point]] = []
    for i, pts in enumerate(raw):
        if normalised:
            pts = [(x * width, y * height) for x, y in pts]
        name = f"{input_name} (image {i})" if per_image else input_name
        _check_bounds(pts, width, height, name, normalised=normalised)
        out.append(pts)
    return out


def _check_bounds(pts: Iterable[Point], width: int, height: int, input_name: str,
                  normalised: bool = False) -> None:
    for k, (x, y) in enumerate(pts):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise PointsError(input_name, f"point {k} ({x}, {y}) is not finite",
                              "give finite pixel coordinates inside the image")
        if not (0.0 <= x <= width and 0.0 <= y <= height):
            hint = " (read as normalised 0-1 coordinates)" if normalised else ""
            raise PointsError(
                input_name,
                f"point {k} at (x={x:g}, y={y:g}){hint} lies outside the {width}x{height} "
                f"(width x height) image",
                f"use pixel coordinates with 0 <= x <= {width} and 0 <= y <= {height} of the image "
                "the points belong to (click them again on this image, or rescale them)",
            )


def _check_size(width: Any, height: Any, batch: Any, input_name: str) -> None:
    for name, v in (("width", width), ("height", height), ("batch", batch)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise PointsError(input_name, f"image {name} must be a positive integer, got {v!r}",
                              "connect a non-empty image batch")


def _size_from(data: dict, input_name: str) -> tuple[int | None, int | None]:
    out = []
    for key in ("width", "height"):
        v = data.get(key)
        if v is None:
            out.append(None)
            continue
        try:
            ok = _is_number(v) and math.isfinite(float(v)) and float(v) > 0
        except OverflowError:
            ok = False
        if not ok:
            raise PointsError(input_name, f"stored {key} {v!r:.40} is not a positive number",
                              "click the points again in the P3S Point Selector")
        out.append(int(round(float(v))))
    return out[0], out[1]


def _images_from_state(data: dict, input_name: str) -> list[ImagePoints]:
    images = data.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list):
        raise PointsError(input_name, f"'images' must be a list, got {type(images).__name__}",
                          "click the points again in the P3S Point Selector")
    _check_image_count(len(images), input_name)
    for i, entry in enumerate(images):
        if isinstance(entry, dict):
            for kind in ("positive", "negative"):
                if isinstance(entry.get(kind), list):
                    _check_count(len(entry[kind]), input_name, f"image {i} ({kind})")
    out = []
    for i, entry in enumerate(images):
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise PointsError(input_name, f"images[{i}] must be an object with 'positive' / "
                              f"'negative' lists, got {type(entry).__name__}",
                              "click the points again in the P3S Point Selector")
        lists = []
        for kind in ("positive", "negative"):
            pts = entry.get(kind, [])
            pts = [] if pts is None else pts
            if not isinstance(pts, list):
                raise PointsError(input_name, f"images[{i}].{kind} must be a list of points",
                                  "click the points again in the P3S Point Selector")
            conv = []
            for k, v in enumerate(pts):
                where = f"{k} of images[{i}].{kind}"
                rx, ry = _raw_point(v, input_name, where)
                conv.append((_number(rx, input_name, where, "x"), _number(ry, input_name, where, "y")))
            lists.append(conv)
        out.append(ImagePoints(positive=lists[0], negative=lists[1]))
    return out


# ---------------------------------------------------------------------------- public API
def parse_coordinates(text: str, width: int, height: int, input_name: str) -> list[Point]:
    """Parse the points of ONE image from a KJNodes Points Editor / SAM2 coordinate string.

    Accepted (tolerant) forms, all in pixels of the ``width`` x ``height`` image:

    * ``[{"x": 312, "y": 205}, ...]`` (ints or floats; extra keys ignored), also with single
      quotes (``[{'x': 312, 'y': 205}]``, as SAM2 accepts);
    * a single ``{"x": .., "y": ..}`` not in a list;
    * a list of ``[x, y]`` pairs, or one bare ``[x, y]`` pair;
    * empty text, whitespace, ``[]`` or ``null`` -> ``[]``.

    Normalised coordinates: if ALL numbers of the string lie in ``[0, 1]`` and at least one of them
    is not a whole number, the string is read as normalised 0-1 coordinates (as some KJNodes
    outputs are) and scaled by ``width`` / ``height``. Whole numbers alone (``{"x": 0, "y": 1}``,
    ``1.0``) are pixels.

    Errors (:class:`PointsError` naming ``input_name``): malformed JSON, a point without x / y,
    non-numeric / NaN / infinite values, a point outside the closed image rectangle
    ``0 <= x <= width, 0 <= y <= height``. Nothing is silently dropped. A per-image list of lists
    with more than one list is refused here (use :func:`points_from_strings` for a batch); a single
    per-image list ``[[{...}]]`` is read as this image's points.
    """
    _check_size(width, height, 1, input_name)
    obj = _load(text, input_name)
    per_image, lists = _structure(obj, input_name)
    if per_image and len(lists) == 1:
        per_image = False  # [[...]]: the one per-image list of a single image
    if per_image:
        raise PointsError(
            input_name,
            f"got {len(lists)} per-image point lists where the points of one image were expected",
            "give one flat list of points, e.g. [{\"x\": 312, \"y\": 205}]",
        )
    return _convert(lists, width, height, input_name, per_image=False)[0]


def format_coordinates(points: Sequence[Point]) -> str:
    """Write points as ``[{"x": 312, "y": 205}, ...]`` with whole pixels (rounded half to even),
    the format the SAM2 nodes and the KJNodes Points Editor read."""
    return json.dumps([{"x": int(round(float(x))), "y": int(round(float(y)))} for x, y in points])


def points_from_strings(positive: str, negative: str, width: int, height: int, batch: int,
                        positive_name: str = "coordinates_positive",
                        negative_name: str = "coordinates_negative") -> P3SPoints:
    """Build :class:`P3SPoints` for a batch of ``batch`` images from two coordinate strings.

    Each string is either a flat list of points (any form accepted by :func:`parse_coordinates`),
    which applies to EVERY image of the batch, or a list of per-image lists
    ``[[{...}, ...], [{...}], ...]`` whose length must equal ``batch`` (image ``i`` takes list
    ``i``). The normalised-coordinate rule of :func:`parse_coordinates` is decided over the whole
    string. Every image must end up with at least one positive point.
    """
    _check_size(width, height, batch, positive_name)
    per_kind = []
    for text, name in ((positive, positive_name), (negative, negative_name)):
        obj = _load(text, name)
        per_image, lists = _structure(obj, name)
        if per_image and len(lists) != batch:
            raise PointsError(
                name,
                f"got {len(lists)} per-image point lists but the image batch has {batch} images",
                f"give exactly {batch} lists (one per image) or one flat list for every image",
            )
        conv = _convert(lists, width, height, name, per_image=per_image)
        if not per_image:
            conv = [list(conv[0]) for _ in range(batch)]
        per_kind.append(conv)
    images = [ImagePoints(positive=per_kind[0][i], negative=per_kind[1][i]) for i in range(batch)]
    for i, im in enumerate(images):
        if not im.positive:
            raise PointsError(
                positive_name,
                f"no positive point on image {i} (of {batch})",
                "click at least one positive point on the subject of every reference image "
                '(e.g. [{"x": 312, "y": 205}])',
            )
    return P3SPoints(images=images, width=int(width), height=int(height))
