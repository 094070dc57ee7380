"""Catalog benchmark, wording: the instruction texts of category, colour, category+colour and edit queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Noun:
    one: str  # singular phrase with a {c} slot for a colour adjective ("pair of {c}trousers")
    many: str  # plural phrase with a {c} slot
    the: str  # definite reference to the item ("the trousers")


_NOUNS = {
    "dress": _Noun("{c}dress", "{c}dresses", "the dress"),
    "hat": _Noun("{c}hat", "{c}hats", "the hat"),
    "longsleeve": _Noun("{c}long-sleeve top", "{c}long-sleeve tops", "the top"),
    "outwear": _Noun("{c}jacket", "{c}jackets", "the jacket"),
    "pants": _Noun("pair of {c}trousers", "{c}trousers", "the trousers"),
    "shirt": _Noun("{c}shirt", "{c}shirts", "the shirt"),
    "shoes": _Noun("pair of {c}shoes", "{c}shoes", "the shoes"),
    "shorts": _Noun("pair of {c}shorts", "{c}shorts", "the shorts"),
    "skirt": _Noun("{c}skirt", "{c}skirts", "the skirt"),
    "t-shirt": _Noun("{c}t-shirt", "{c}t-shirts", "the t-shirt"),
}


def _noun(category: str) -> _Noun:
    if category in _NOUNS:
        return _NOUNS[category]
    word = category.replace("_", " ").replace("-", " ").strip()
    plural = word if word.endswith("s") else word + "s"
    return _Noun("{c}" + word, "{c}" + plural, "the " + word)


def _a(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _one(category: str, colour: str | None = None) -> str:
    return _noun(category).one.format(c=f"{colour} " if colour else "")


def _many(category: str, colour: str | None = None) -> str:
    return _noun(category).many.format(c=f"{colour} " if colour else "")


def category_texts(category: str) -> list[str]:
    a = _a(_one(category))
    return [
        f"show me {a} instead",
        f"same colour but {a}",
        f"I want {a} in this colour",
        f"{_many(category)} in the same colour",
        f"change it to {a}, keep the colour",
        f"do you have {a} like this?",
    ]


def colour_texts(category: str, colour: str) -> list[str]:
    return [
        f"same but in {colour}",
        f"I'd like this in {colour}",
        f"do you have it in {colour}?",
        f"{colour} instead",
        f"the same kind of {_one(category)} but {colour}",
        f"{_many(category, colour)} please",
    ]


def both_texts(category: str, colour: str) -> list[str]:
    a = _a(_one(category, colour))
    return [
        f"show me {a} instead",
        f"I want {a}",
        f"{_many(category, colour)} instead",
        f"change it to {a}",
        f"something else: {a}",
    ]


def edit_texts(kind: str, params: dict[str, Any], category: str) -> list[str]:
    the = _noun(category).the
    if kind == "recolour":
        t = params["target"]
        return [f"recolour {the} {t}", f"dye it {t}", f"the same photo with {the} in {t}", f"paint {the} {t}, keep everything else"]
    if kind == "mirror":
        return ["mirror the photo", "flip it horizontally", "flip the image left to right", "show its mirror image"]
    if kind == "rotate":
        return {
            90: ["rotate it 90 degrees counter-clockwise", "turn the photo a quarter turn to the left", "rotate left by 90 degrees"],
            180: ["turn the photo upside down", "rotate it 180 degrees", "flip it upside down by rotating"],
            270: ["rotate it 90 degrees clockwise", "turn the photo a quarter turn to the right", "rotate right by 90 degrees"],
        }[int(params["angle"])]
    if kind == "crop":
        z = {1.5: "1.5x", 2.0: "2x"}[float(params["zoom"])]
        where = {"centre": "the centre", "top": "the top", "bottom": "the bottom"}[params["region"]]
        return [f"zoom in {z} on {where}", f"crop closer, {z}, to {where} of the photo", f"a {z} close-up of {where}"]
    if kind == "brightness":
        if float(params["factor"]) < 1:
            return ["make the photo darker", "darken the image", "the same photo but darker"]
        return ["make the photo brighter", "brighten the image", "the same photo but brighter"]
    raise ValueError(kind)
