"""Named dominant colour of the item in a catalog photo (numpy + Pillow only).

The item is separated from the background by colour distance to the background, which is estimated from the
photo's border (catalog photos show one item, roughly centred, on a floor, bed, wall or sheet). The item's
pixels are clustered with a small weighted k-means in CIELAB (a perceptual space) and every cluster centre is
named with the nearest prototype of a fixed palette; the name covering the most (centre-weighted) item pixels
wins, so a navy shirt whose shadows fall near "black" is still "blue".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# The palette: name -> sRGB prototypes (several per name: a name covers a region of colour space, e.g. navy and
# light blue are both "blue"). Order of names is the canonical order used in statistics and manifests.
PALETTE: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((15, 15, 15), (38, 38, 40)),
    "grey": ((80, 80, 80), (120, 120, 120), (160, 160, 160), (100, 102, 108)),
    "white": ((245, 245, 245), (222, 222, 222), (228, 226, 220), (200, 200, 200)),
    "red": ((200, 30, 40), (155, 20, 30), (115, 25, 35), (225, 60, 55), (100, 30, 50)),
    "orange": ((240, 130, 40), (215, 95, 30), (245, 160, 90)),
    "yellow": ((240, 210, 50), (245, 230, 120), (205, 175, 45)),
    "green": ((40, 150, 60), (30, 85, 50), (120, 190, 110), (85, 105, 55), (35, 140, 120)),
    "blue": ((40, 70, 170), (25, 35, 80), (110, 160, 220), (70, 110, 160), (45, 150, 205), (40, 50, 110), (90, 105, 130), (28, 32, 52), (50, 55, 78)),
    "purple": ((120, 50, 150), (80, 40, 110), (170, 120, 200), (60, 35, 80)),
    "pink": ((240, 140, 180), (220, 80, 140), (250, 195, 205), (195, 95, 120), (215, 175, 185)),
    "brown": ((110, 70, 40), (75, 50, 30), (140, 100, 60), (95, 75, 60)),
    "beige": ((225, 205, 170), (200, 180, 145), (238, 222, 195), (175, 160, 135)),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)
ACHROMATIC = ("black", "grey", "white")
# One clean representative per name: the colour a recolour edit paints an item with.
REPRESENTATIVE: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "white": (240, 240, 240),
    "red": (200, 30, 40),
    "orange": (240, 130, 40),
    "yellow": (240, 210, 50),
    "green": (40, 150, 60),
    "blue": (40, 75, 175),
    "purple": (120, 50, 150),
    "pink": (235, 120, 170),
    "brown": (110, 70, 40),
    "beige": (225, 205, 170),
}
# Pixels below this chroma are named among black/grey/white only (hue is noise there).
ACHROMATIC_CHROMA = 7.0
# Lightness counts less than hue/chroma when naming: shading changes L, not the colour's name.
L_WEIGHT = 0.6

_D65 = np.array([0.95047, 1.0, 1.08883])
_M_RGB2XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_M_XYZ2RGB = np.linalg.inv(_M_RGB2XYZ)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8 or float in 0..255), shape (..., 3) -> CIELAB (D65), float64."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _M_RGB2XYZ.T / _D65
    d = 6.0 / 29.0
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4.0 / 29.0)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) -> sRGB float in 0..255 (not clipped)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = fy + lab[..., 1] / 500.0
    fz = fy - lab[..., 2] / 200.0
    d = 6.0 / 29.0
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f > d, f**3, 3 * d * d * (f - 4.0 / 29.0)) * _D65
    lin = xyz @ _M_XYZ2RGB.T
    lin = np.clip(lin, 0.0, None)
    c = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return c * 255.0


_PROTO_NAMES = np.array([n for n, protos in PALETTE.items() for _ in protos])
_PROTO_LAB = srgb_to_lab(np.array([p for protos in PALETTE.values() for p in protos], dtype=np.float64))
_ACHRO_MASK = np.isin(_PROTO_NAMES, ACHROMATIC)


def name_lab(lab: np.ndarray) -> np.ndarray | str:
    """Palette name of each CIELAB colour (shape (..., 3)); a single colour gives a ``str``."""
    lab = np.asarray(lab, dtype=np.float64)
    single = lab.ndim == 1
    x = lab.reshape(-1, 3)
    diff = x[:, None, :] - _PROTO_LAB[None, :, :]
    diff[..., 0] *= L_WEIGHT
    dist = np.einsum("npk,npk->np", diff, diff)
    chroma = np.hypot(x[:, 1], x[:, 2])
    # Near-neutral colours may only be named black/grey/white.
    dist[chroma < ACHROMATIC_CHROMA] = np.where(_ACHRO_MASK, dist[chroma < ACHROMATIC_CHROMA], np.inf)
    names = _PROTO_NAMES[np.argmin(dist, axis=1)]
    if single:
        return str(names[0])
    return names.reshape(lab.shape[:-1])


def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def kmeans(x: np.ndarray, k: int, weights: np.ndarray | None = None, iters: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means on rows of ``x`` (k-means++ init from a fixed seed, so it is deterministic).

    Returns ``(centres, labels)``; fewer than ``k`` centres when ``x`` has fewer distinct points.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("kmeans on an empty set")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    centres = [x[rng.choice(n, p=w / w.sum())]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, min(k, n)):
        p = d2 * w
        if p.sum() <= 1e-12:
            break  # every point already sits on a centre
        centres.append(x[rng.choice(n, p=p / p.sum())])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.array(centres)
    labels = _sqdist(x, c).argmin(1)
    for _ in range(iters):
        mass = np.bincount(labels, weights=w, minlength=len(c))
        sums = np.stack([np.bincount(labels, weights=w * x[:, d], minlength=len(c)) for d in range(x.shape[1])], 1)
        filled = mass > 0
        c[filled] = sums[filled] / mass[filled, None]
        new = _sqdist(x, c).argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
    return c, labels


@dataclass(frozen=True)
class ColourEstimate:
    name: str  # palette name of the item's dominant colour
    lab: tuple[float, float, float]  # CIELAB centre of the dominant cluster
    rgb: tuple[int, int, int]  # the same in sRGB, for display
    share: float  # centre-weighted share of item pixels carrying ``name`` (confidence)
    fg_fraction: float  # share of the photo classified as item
    fallback: bool  # True when no item was separable from the background and the centre region was used

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "lab": [round(v, 2) for v in self.lab],
            "rgb": list(self.rgb),
            "share": round(self.share, 4),
            "fg_fraction": round(self.fg_fraction, 4),
            "fallback": self.fallback,
        }


MIN_BG_THRESHOLD = 10.0  # CIELAB units: an item closer than this to its background cannot be told apart
ANALYSIS_SIZE = 96  # shorter side (px) the colour analysis runs at: plenty for a dominant colour, fast


def _small(img: Image.Image, size: int = ANALYSIS_SIZE) -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    if s >= 1:
        return img
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)


def _centre_prior(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-(((yy - (h - 1) / 2) / (0.32 * h)) ** 2 + ((xx - (w - 1) / 2) / (0.32 * w)) ** 2) / 2)


def foreground_mask(img: Image.Image) -> tuple[np.ndarray, bool]:
    """Boolean item mask of ``img`` (any size; computed on the image as given).

    Background colours are the k-means clusters (k=4) of a border band that show on at least three of the
    four sides or fill most of two (trousers touching the top and bottom edges are not background). Each
    background colour is fitted as a plane over the image (lighting gradients); a pixel is item when its
    (lightness-discounted) CIELAB distance to every background plane exceeds a threshold adapted to that
    colour's spread (textured floors spread more). A morphological opening then removes grout lines and texture speckle. When almost nothing
    survives, the central ellipse is used instead. Returns ``(mask, used_fallback)``.
    """
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w = rgb.shape[:2]
    lab = srgb_to_lab(rgb)
    band = max(2, round(0.06 * min(h, w)))
    border = np.ones((h, w), dtype=bool)
    border[band:-band, band:-band] = False
    bpix = lab[border]
    # Which side of the frame each border pixel lies on (corners count for both sides).
    yy, xx = np.mgrid[0:h, 0:w]
    sides = np.stack([yy < band, yy >= h - band, xx < band, xx >= w - band], axis=-1)[border]
    scale = np.array([0.6, 1.0, 1.0])  # shadows mostly change lightness
    centres, labels = kmeans(bpix * scale, 4, seed=0)
    # A background colour shows on at least 3 of the 4 sides, or fills most of 2 of them; trousers touching
    # the top and bottom edges do neither.
    side_share = np.array([[(labels[sides[:, s]] == j).mean() for s in range(4)] for j in range(len(centres))])
    is_bg = ((side_share >= 0.1).sum(1) >= 3) | ((side_share >= 0.5).sum(1) >= 2)
    if not is_bg.any():
        is_bg[np.argmax(np.bincount(labels, minlength=len(centres)))] = True
    # Each background colour is modelled as a plane over the image (colour = c + gx*x + gy*y): lighting
    # gradients and vignetting across a floor then do not turn its brighter middle into "item".
    coords = np.stack([np.ones((h, w)), xx / max(w - 1, 1) - 0.5, yy / max(h - 1, 1) - 0.5], axis=-1)
    bcoords = coords[border]
    dist = np.full((h, w), np.inf)
    for j in range(len(centres)):
        if not is_bg[j]:
            continue
        members = labels == j
        coef, *_ = np.linalg.lstsq(bcoords[members], bpix[members] * scale, rcond=None)
        spread = np.sqrt(((bcoords[members] @ coef - bpix[members] * scale) ** 2).sum(1))
        thr = float(np.clip(np.percentile(spread, 90) * 1.5, MIN_BG_THRESHOLD, 25.0))
        d = np.sqrt(((coords @ coef - lab * scale) ** 2).sum(-1)) / thr
        dist = np.minimum(dist, d)
    fg = dist > 1.0
    m = Image.fromarray((fg * 255).astype(np.uint8))
    m = m.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))  # opening
    m = m.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))  # closing: fill pin-holes
    fg = np.asarray(m) > 127
    prior = _centre_prior(h, w)
    if (fg * prior).sum() < 0.12 * prior.sum():
        yy, xx = np.mgrid[0:h, 0:w]
        return (((yy - (h - 1) / 2) / (0.3 * h)) ** 2 + ((xx - (w - 1) / 2) / (0.3 * w)) ** 2) <= 1.0, True
    return fg, False


def dominant_colour_of(lab_pixels: np.ndarray, weights: np.ndarray, k: int = 4) -> tuple[str, np.ndarray, float]:
    """Name, CIELAB centre and weighted share of the dominant named colour among ``lab_pixels`` (N, 3)."""
    centres, labels = kmeans(lab_pixels, k, weights=weights, seed=0)
    names = [str(name_lab(c)) for c in centres]  # one colour each: a str
    mass = np.bincount(labels, weights=weights, minlength=len(centres))
    per_name: dict[str, float] = {}
    for n, m in zip(names, mass, strict=True):
        per_name[n] = per_name.get(n, 0.0) + float(m)
    # Ties resolved by palette order so the result never depends on cluster numbering.
    best = max(COLOUR_NAMES, key=lambda n: (per_name.get(n, -1.0), -COLOUR_NAMES.index(n)))
    idx = [j for j, n in enumerate(names) if n == best]
    centre = np.average(centres[idx], axis=0, weights=mass[idx] + 1e-12)
    return best, centre, per_name[best] / max(float(mass.sum()), 1e-12)


def estimate_colour(img: Image.Image) -> ColourEstimate:
    """The item's named dominant colour (see module docstring). Deterministic."""
    small = _small(img)
    fg, fallback = foreground_mask(small)
    rgb = np.asarray(small.convert("RGB"), dtype=np.float64)
    h, w = fg.shape
    prior = _centre_prior(h, w)
    lab = srgb_to_lab(rgb)
    name, centre, share = dominant_colour_of(lab[fg], prior[fg])
    srgb = np.clip(np.round(lab_to_srgb(centre)), 0, 255).astype(int)
    return ColourEstimate(
        name=name,
        lab=(float(centre[0]), float(centre[1]), float(centre[2])),
        rgb=(int(srgb[0]), int(srgb[1]), int(srgb[2])),
        share=float(share),
        fg_fraction=float(fg.mean()),
        fallback=fallback,
    )
