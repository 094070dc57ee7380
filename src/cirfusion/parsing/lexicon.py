"""Word lists the rule parser reads: edit verbs by operation, nouns that name a place or a property rather than a
thing, and modifiers that are not attributes. Lemmas, lower case."""

from __future__ import annotations

ADD_VERBS = frozenset({"add", "put", "place", "insert", "draw", "include", "introduce", "attach", "append", "paste",
                       "bring"})
REMOVE_VERBS = frozenset({"remove", "delete", "erase", "drop", "lose", "eliminate", "exclude", "omit", "discard",
                          "cut", "ditch", "hide"})
REPLACE_VERBS = frozenset({"replace", "swap", "substitute", "exchange", "switch"})
KEEP_VERBS = frozenset({"keep", "retain", "preserve", "maintain", "leave"})
CHANGE_VERBS = frozenset({"make", "turn", "change", "paint", "colour", "color", "recolour", "recolor", "dye", "move",
                          "shift", "relocate", "rotate", "flip", "enlarge", "shrink", "increase", "reduce", "scale",
                          "resize", "darken", "lighten", "brighten", "zoom", "convert", "transform", "alter",
                          "modify", "adjust", "set", "render", "give", "focus", "crop", "go", "become", "get"})
# Verbs whose object is a thing placed somewhere: with "the" (an object already there) they move it.
PLACE_VERBS = frozenset({"put", "place"})
# Change verbs that imply a size (the attribute the edit sets) and the particle that picks it.
SIZE_VERBS = {"enlarge": "larger", "grow": "larger", "shrink": "smaller", "expand": "larger", "widen": "wider",
              "shorten": "shorter", "lengthen": "longer", "darken": "darker", "lighten": "lighter",
              "brighten": "brighter"}
SIZE_PARTICLE = {("scale", "up"): "larger", ("scale", "down"): "smaller", ("size", "up"): "larger",
                 ("size", "down"): "smaller"}
SIZE_DIRECTION = {"increase": "larger", "reduce": "smaller", "decrease": "smaller", "enlarge": "larger"}
COPULAS = frozenset({"be", "look", "seem", "appear", "become", "remain", "stay", "feel"})
HAVE_VERBS = frozenset({"have", "feature", "contain", "include", "wear", "show", "sport", "come"})

# Nouns naming a place in the picture, not a thing ("the top left corner", "to the left of").
POSITION_NOUNS = frozenset({"left", "right", "top", "bottom", "middle", "centre", "center", "corner", "side", "front",
                            "back", "rear", "edge", "row", "column", "foreground", "distance", "somewhere", "place",
                            "position", "spot", "area", "part", "half", "end", "way", "direction", "location",
                            "instead", "lot", "bit"})
# Position nouns that make a spatial predicate with "of": "to the left of Y" -> "left of".
POSITION_PREDICATES = {"left": "left of", "right": "right of", "front": "in front of", "top": "on top of",
                       "back": "behind", "rear": "behind", "bottom": "below", "middle": "in middle of",
                       "centre": "in middle of", "center": "in middle of", "edge": "on edge of"}
# Nouns naming a property ("the colour of", "in color"): never entities.
PROPERTY_NOUNS = frozenset({"colour", "color", "shade", "tone", "hue", "tint", "size", "length", "width", "height",
                            "texture", "style", "shape", "fit", "cut", "amount", "number", "kind", "type", "sort",
                            "variety", "version", "quality", "brightness", "lighting"})
# Property nouns that are also things a scene can hold ("the red shape"): entities unless "the shape of" / "in shape".
THING_PROPERTY_NOUNS = frozenset({"shape", "style", "cut"})
# Nouns naming the picture itself, not something in it.
META_NOUNS = frozenset({"image", "picture", "photo", "photograph", "pic", "shot", "view", "scene", "version",
                        "target", "reference", "angle", "close", "closeup", "perspective", "frame", "match", "presence",
                        "addition", "focus", "effect", "zoom", "shot", "backdrop_of",
                        "same", "thing", "stuff", "kind", "lot", "bit", "difference", "instead"})
# "a group of dogs" -> dog: the noun after "of" is the entity.
PARTITIVE_NOUNS = frozenset({"breed", "species", "body", "presence", "group", "pair", "couple", "bunch", "set", "pack", "herd", "flock", "collection",
                             "number", "lot", "lots", "pile", "stack", "row", "kind", "type", "sort", "variety",
                             "piece", "slice", "close", "closeup", "picture", "image", "photo", "view", "shot",
                             "amount", "plenty", "few", "couple", "bowl", "cup", "glass", "plate"})
# The partitives whose "of" noun is the entity and which are not entities themselves (a bowl of soup keeps both).
PURE_PARTITIVES = PARTITIVE_NOUNS - {"bowl", "cup", "glass", "plate", "pile", "stack", "row"}
# Modifiers that quantify or point rather than describe.
NON_ATTRIBUTES = frozenset({"other", "another", "same", "different", "similar", "extra", "additional", "only", "single",
                            "more", "less", "few", "several", "many", "much", "whole", "entire", "certain", "such",
                            "new", "own", "various", "own", "main", "actual", "overall", "general", "very", "exact",
                            "identical", "left", "right", "top", "bottom", "middle", "center", "centre", "front",
                            "back", "second", "first", "third", "last", "next", "previous", "current", "original",
                            "instead", "also", "just", "too", "so", "rather", "both", "all", "some", "any", "each",
                            "every", "no", "same", "like", "rid", "away", "else", "different", "one", "possible", "visible", "present", "shown",
                            "pictured", "related", "certain", "n't", "not", "most", "least", "mostly", "slightly",
                            "little_bit", "somewhat", "quite", "really", "fairly", "pretty", "bit", "lot"})
# Adverbs kept in front of an adjective: "more fitted", "less busy", "light blue".
GRADERS = frozenset({"more", "less", "light", "dark", "bright", "pale", "deep", "lighter", "darker", "much_more"})
PRONOUNS = frozenset({"it", "this", "that", "they", "them", "its", "itself"})
ADD_CUES = frozenset({"another", "extra", "additional", "plus", "more"})
IMPLICIT_NAME = "garment"
COLOURS = frozenset({"red", "orange", "yellow", "green", "cyan", "blue", "purple", "white", "black", "grey", "gray",
                     "brown", "pink", "violet", "turquoise", "beige", "navy", "maroon", "teal", "gold", "golden",
                     "silver", "tan", "cream", "khaki", "olive", "lilac", "lavender", "magenta", "burgundy", "ivory",
                     "coral", "peach", "mint", "charcoal", "nude", "aqua", "indigo", "rust", "mustard", "crimson",
                     "scarlet", "fuchsia", "salmon", "copper", "bronze", "blonde", "blond", "multicolored",
                     "multicoloured", "colorful", "colourful"})
COLOURED = frozenset({"colored", "coloured", "toned", "hued"})
# Prepositions that take what is left out: "without the hat".
REMOVE_PREPS = frozenset({"without", "excluding", "except", "minus", "sans", "less"})
SPATIAL_PREPS = frozenset({"on", "in", "at", "above", "below", "under", "underneath", "beneath", "behind", "beside",
                           "near", "over", "inside", "outside", "around", "between", "against", "along", "across",
                           "through", "by", "atop", "beyond", "within", "onto", "into", "among", "next to",
                           "with", "of", "from", "toward", "towards", "to", "up", "down", "off", "out", "for",
                           "about", "like", "near to", "close to", "in front of", "on top of"})
EDIT_VERBS = ADD_VERBS | REMOVE_VERBS | REPLACE_VERBS | KEEP_VERBS | CHANGE_VERBS
IMPLICIT_SUBJECT_VERBS = frozenset({"be", "look", "seem", "appear", "have", "feature", "come", "become", "remain"})
# Adjectives the small tagger often takes for nouns ("the big cross": big/NN).
ADJECTIVES = frozenset({"big", "small", "large", "little", "tiny", "huge", "tall", "short", "long", "wide", "narrow",
                        "thin", "thick", "bigger", "smaller", "larger", "tinier", "shorter", "longer", "taller",
                        "plain", "solid", "dark", "light", "bright", "pale", "sleeveless", "striped", "floral",
                        "plaid", "checkered", "shiny", "loose", "tight", "fitted", "casual", "formal"})
# Words that make one attribute with the next: "light blue", "more fitted"; and the participles that make one with
# the word before: "long sleeved", "v shaped".
COLOUR_GRADERS = frozenset({"light", "dark", "pale", "deep", "bright", "lighter", "darker", "brighter", "solid", "pure",
                            "hot", "baby", "royal", "neon", "pastel", "dusty", "muted", "vivid", "off"})
DEGREE = frozenset({"more", "less", "most", "least", "much"})
SUFFIXED = frozenset({"sleeved", "shaped", "toed", "necked", "heeled", "patterned", "printed", "laced", "strapped"})
# Garment and shoe parts: after an adjective inside a chunk they describe the head ("long sleeve shirt").
PART_NOUNS = frozenset({"sleeve", "neck", "collar", "heel", "toe", "strap", "length", "waist", "hem", "neckline",
                        "button", "lace", "sole", "print", "pattern"})
# Position words that name a part when right before a noun ("top strap", "side pocket").
PART_POSITIONS = frozenset({"top", "bottom", "side", "front", "back"})
GARMENTS = frozenset({"dress", "shirt", "tee", "top", "blouse", "skirt", "shoe", "sneaker", "boot", "sandal", "jacket",
                      "coat", "sweater", "t-shirt", "t shirt", "tank", "gown", "pant", "jean", "short", "hoodie",
                      "cardigan", "vest", "heel", "pump", "loafer", "flat", "slipper", "tunic", "jumpsuit", "romper",
                      "polo", "turtleneck", "button down", "low-top", "high-top", "cowlneck", "halter", "tank top", "bikini",
                      "swimsuit", "sweatshirt", "pullover", "camisole", "tshirt", "sneakers"})
# Adjectives that with a part noun describe a garment ("long sleeve", "high heel").
PART_DESCRIBERS = frozenset({"long", "short", "high", "low", "wide", "narrow", "thick", "thin", "flat", "open", "closed",
                             "cap", "half", "full", "square", "round", "pointed", "pointy", "v", "deep", "crew"})
