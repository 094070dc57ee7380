"""DAFM: Dynamic Adaptive Fusion of K >= 2 frozen CIR models (arXiv 2511.05020) as a method like any other.

The fused model keeps its base models and a tiny :class:`~cirfusion.fusion.network.FusionNet` (about 1-2 k
parameters):

- ``encode_query(ref, text)`` -> ``{"q": (q_1, ..., q_K), "fp": [B]}``: every base model's query embedding, plus the
  reference image's fingerprint (for the reference exclusion, see :mod:`cirfusion.fusion.tables`);
- base models may read different backbones (as DAFM's pool does: CLIP, BLIP, BLIP-2): the fused model then reads a
  ``multi:ID1|ID2`` backbone (:mod:`cirfusion.backbones.multi`), the parts side by side, and gives each base its part;
- ``encode_gallery(img)``     -> ``{"g": (g_1, ..., g_K), "fp": [N]}``;
- ``similarity(q, g)``        -> ``[B, N]`` fused scores: each base model's own similarity for a tile of queries,
  normalised per query, fused by the network. Tiles keep every block under ``BLOCK_ELEMS`` elements.

So ``cirfusion eval``, ``cirfusion.load`` and everything built on the method contract work on a fused checkpoint.
It is trained by ``cirfusion fuse`` (:func:`cirfusion.fusion.fit.fit`, InfoNCE over the gallery with the dynamic
temperature);
the generic in-batch loss (``loss``, used by the shared training loop) also works and trains only the fusion network.

Checkpoint layout (safetensors + JSON, no pickle)::

    FUSED/config.json              method "dafm"; hparams["bases"] lists each base: name, method, hyper-parameters,
                                   feature dims, training dataset, source checkpoint
    FUSED/model.safetensors        the fusion network only (and the final temperature)
    FUSED/bases/00-NAME/           each base model's own checkpoint (config.json + model.safetensors), loadable alone

The base models are not registered sub-modules: they are frozen, never in ``parameters()``, and their weights live in
their own sub-directories (written and read through the ``save_components`` / ``load_components`` hooks of
:mod:`cirfusion.checkpoint`).

This module owns inference and imports only the fusion package's kernels and network (never its fitting, which builds
this class through the method registry): no import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..backbones.base import ImageFeatures, TextFeatures
from ..backbones.multi import PartSlice, composite_fields, feature_parts, part_slices
from ..checkpoint import MODEL_FILE, CheckpointError, load_state_strict, load_weights, read_config, write_checkpoint_files
from ..embeddings import Embedding, rows_of
from ..fusion.kernels import (
    SCORE_DTYPES,
    Normalised,
    base_scores,
    block_rows,
    fingerprint_exclusion,
    image_fingerprint,
    normalise_scores,
    single_thread_if_small,
    storage_dtype,
    uses_default_similarity,
)
from ..fusion.network import FusionNet
from ..fusion.score_paths import ScorePath, choose_score_dtype
from ..fusion.shapley import check_num_models, shapley_values
from .base import CIRMethod, HyperParameterError, MethodDims, Stage, hparam
from .registry import create_method, register_method

BASES_DIR = "bases"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _normalise_specs(specs: Sequence[Mapping[str, Any]], dims: MethodDims) -> list[dict[str, Any]]:
    if not isinstance(specs, (list, tuple)) or len(specs) < 2:
        raise HyperParameterError(f"dafm: 'bases' must list at least two base models, got {specs!r}")
    out: list[dict[str, Any]] = []
    used: set[str] = set()
    for i, s in enumerate(specs):
        if not isinstance(s, Mapping) or not isinstance(s.get("method"), str):
            raise HyperParameterError(f"dafm: base {i} must be a mapping with a 'method' name, got {s!r}")
        unknown = set(s) - {"name", "method", "hparams", "dims", "dataset", "source"}
        if unknown:
            raise HyperParameterError(f"dafm: base {i} has unknown field(s) {sorted(unknown)}")
        if s["method"] == "dafm":
            raise HyperParameterError("dafm: a base model cannot itself be a dafm fusion")
        name = _SAFE.sub("-", str(s.get("name") or s["method"])).strip("-") or f"model{i}"
        base_name, j = name, 2
        while name in used:
            name, j = f"{base_name}-{j}", j + 1
        used.add(name)
        out.append({"name": name, "method": s["method"], "hparams": dict(s.get("hparams") or {}),
                    "dims": dict(s["dims"]) if s.get("dims") else dims.to_dict(),
                    "dataset": s.get("dataset"), "source": s.get("source")})
    return out


def composite_dims(parts: Sequence[Any]) -> MethodDims:
    """The :class:`MethodDims` of the ``multi:`` backbone over ``parts`` (what
    :class:`~cirfusion.backbones.multi.MultiBackbone` reports, computed without building it)."""
    return MethodDims(**composite_fields(parts), aligned=False)


def _check_same_features(dims: MethodDims, other: MethodDims, what: str) -> None:
    for f in ("backbone_id", "weights_hash", "preprocess_id", "image_dim", "text_dim", "num_image_tokens", "max_text_tokens"):
        if getattr(dims, f) != getattr(other, f):
            raise HyperParameterError(f"dafm: {what} reads features with {f}={getattr(other, f)!r}, the fused model "
                             f"{getattr(dims, f)!r}: the fused model must read its base models' backbone (or, for "
                             "bases on several backbones, their multi: composite)")


def _default_bases() -> list[dict[str, Any]]:
    return [{"method": "image-only"}, {"method": "clip4cir"}]


@dataclass
class DafmParams:
    """DAFM's hyper-parameters."""

    bases: list[dict[str, Any]] = hparam(help="base models: [{method, hparams, dims, name, dataset, source}]; the default "
                                         "(two fresh models) only makes create_method('dafm', dims) work; cirfusion fuse "
                                         "and DAFM.from_bases set trained ones", factory=_default_bases)
    hidden: int = hparam(16, "width of each residual block's 1x1 convolutions")
    blocks: int = hparam(1, "residual refinement blocks")
    gate_hidden: int = hparam(32, "width of the MLP from score statistics to model weights")
    topk: int = hparam(32, "top-k candidates the score statistics look at")
    beta: float = hparam(4.0, "sharpness of the softmax whose entropy is a statistic")
    exclude_reference: bool = hparam(True, "leave the reference out of the statistics (set from the training dataset)")
    tile: int = hparam(64, "queries fused at once (fewer when the gallery is large)")
    tau0: float = hparam(0.02, "temperature of the in-batch loss until a fit sets the final one")
    # A query's cost is reading K galleries: half precision halves the bytes, int8 quarters them; which streams
    # fastest depends on the CPU, so "auto" measures it (cirfusion.fusion.score_paths)
    score_dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = hparam(
        "auto", "precision of default-similarity base scores against an encoded gallery: auto (the fastest path on this "
        "machine whose top-10 stays >= 99% equal to float32's, chosen at first use and cached per CPU), float32 (exact), "
        "bfloat16 (~1e-2), float16 (~1e-4), int8 (~3e-3)")


@register_method("dafm")
class DAFM(CIRMethod):
    """Dynamic Adaptive Fusion of K >= 2 frozen CIR models: per-query normalised scores, query-aware model weights,
    residual 1x1-convolution refinement (see cirfusion.fusion)."""

    Params = DafmParams
    params: DafmParams

    tau: torch.Tensor  # the temperature (a buffer: saved with the fusion network)

    def __init__(self, dims: MethodDims, _bases: Sequence[CIRMethod] | None = None, **hparams: Any) -> None:
        super().__init__(dims, **hparams)
        specs = _normalise_specs(self.params.bases, dims)
        if _bases is None:
            bases = [create_method(s["method"], MethodDims.from_dict(s["dims"]), **s["hparams"]) for s in specs]
        else:
            bases = list(_bases)
            if len(bases) != len(specs):
                raise ValueError(f"dafm: {len(bases)} base models given for {len(specs)} specs")
        # Bases on several backbones: the fused model reads their multi: composite and hands each base its part.
        fp = feature_parts([b.dims for b in bases])
        self._cut: list[PartSlice] | None = None
        if fp is None:
            for b, s in zip(bases, specs, strict=True):
                _check_same_features(dims, b.dims, f"base {s['name']!r}")
        else:
            parts, part_of = fp
            _check_same_features(dims, composite_dims(parts), "its base models together")
            sl = part_slices(parts)
            self._cut = [sl[i] for i in part_of]
        for b, s in zip(bases, specs, strict=True):
            s["hparams"] = dict(b.hparams)  # every hyper-parameter, defaults included: reload rebuilds exactly
            s["dims"] = b.dims.to_dict()
            if b.method_name and b.method_name != s["method"]:
                raise ValueError(f"dafm: base {s['name']!r} is a {b.method_name!r}, its spec says {s['method']!r}")
            b.eval()
            for p in b.parameters():
                p.requires_grad_(False)
        self.params.bases = specs
        # Not registered as sub-modules: frozen, outside parameters()/state_dict(), saved in their own directories.
        self._bases: list[CIRMethod] = bases
        self.uses_image_tokens = any(b.uses_image_tokens for b in bases)
        self.uses_text_tokens = any(b.uses_text_tokens for b in bases)
        h = self.params
        # "auto" is resolved at first use (score_dtype): the probe costs about a second once per machine
        self._score_path: ScorePath | None = None if h.score_dtype == "auto" else ScorePath(h.score_dtype, "explicit")
        self.fusion = FusionNet(len(bases), h.hidden, h.blocks, h.gate_hidden)
        # How a query's work is mapped over the K base models (encoders, then gallery scores): the builtin map, in
        # turn on this thread. Not saved: a server sets a thread pool's map (cirfusion.serve) so that one query's
        # bases run side by side on several cores, each on one torch thread -- the same computation, the same scores.
        self.base_map: Callable[..., Iterable[Any]] = map
        self.register_buffer("tau", torch.tensor(h.tau0))

    # ---- construction -------------------------------------------------------------------------------------------------
    @classmethod
    def from_bases(cls, bases: Sequence[CIRMethod], names: Sequence[str] | None = None,
                   base_info: Sequence[Mapping[str, Any]] | None = None, **hparams: Any) -> "DAFM":
        """A fused model over trained ``bases`` (used as they are, frozen). ``base_info[i]`` may give ``dataset``
        and ``source`` (recorded in the config)."""
        if len(bases) < 2:
            raise HyperParameterError(f"dafm: fusion needs at least two base models, got {len(bases)}")
        specs = []
        for i, b in enumerate(bases):
            info = dict(base_info[i]) if base_info else {}
            specs.append({"name": (names[i] if names else None) or b.method_name or f"model{i}",
                          "method": b.method_name or type(b).__name__, "dataset": info.get("dataset"),
                          "source": info.get("source")})
        fp = feature_parts([b.dims for b in bases])
        return cls(bases[0].dims if fp is None else composite_dims(fp[0]), _bases=bases, bases=specs, **hparams)

    @property
    def bases(self) -> list[CIRMethod]:
        return list(self._bases)

    @property
    def base_names(self) -> list[str]:
        return [s["name"] for s in self.params.bases]

    @property
    def num_models(self) -> int:
        return len(self._bases)

    # Keep the (unregistered) bases on the same device/dtype and always in eval mode.
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "DAFM":
        for b in getattr(self, "_bases", []):
            b._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "DAFM":
        super().train(mode)
        for b in getattr(self, "_bases", []):
            b.eval()
        return self

    # ---- the contract -----------------------------------------------------------------------------------------------
    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> dict[str, Any]:
        cuts = self._cuts()

        def one(k: int) -> Embedding:
            b, c = self._bases[k], cuts[k]
            with torch.no_grad():  # grad mode is per thread: set where the work runs (base_map may use threads)
                return b.encode_query(ref, text) if c is None else b.encode_query(c.image(ref), c.text(text))

        with torch.no_grad():
            return {"q": tuple(self.base_map(one, range(len(self._bases)))), "fp": image_fingerprint(ref.global_)}

    def _cuts(self) -> list[PartSlice | None]:
        """Per base, the slice of the (multi: backbone's) features it reads, or None for all of them."""
        if self._cut is None:
            return [None] * len(self._bases)
        return list(self._cut)

    def encode_gallery(self, img: ImageFeatures) -> dict[str, Any]:
        """Default-similarity models' gallery embeddings are stored in ``score_dtype`` (what scoring reads)."""
        with torch.no_grad():
            g = []
            for b, c in zip(self._bases, self._cuts(), strict=True):
                e = b.encode_gallery(img if c is None else c.image(img))
                if isinstance(e, torch.Tensor) and uses_default_similarity(b):
                    e = e.to(storage_dtype(self.score_dtype))
                g.append(e)
            return {"g": tuple(g), "fp": image_fingerprint(img.global_)}

    def score_path(self) -> ScorePath:
        """How default-similarity base scores are computed: the explicit ``score_dtype``, or what ``auto`` chose on
        this machine, with the probe's timings and accuracy behind it (:mod:`cirfusion.fusion.score_paths`)."""
        if self._score_path is None:
            self._score_path = choose_score_dtype()
        return self._score_path

    @property
    def score_dtype(self) -> torch.dtype:
        """The torch dtype of the scoring path (:meth:`score_path`): what fitting, evaluation and queries use alike."""
        return SCORE_DTYPES[self.score_path().dtype]

    def normalised_tiles(self, q: Mapping[str, Any], g: Mapping[str, Any]) -> Iterator[Normalised]:
        """Yield the normalised scores of each tile of queries: what :meth:`similarity`, :meth:`explain` and
        :meth:`contributions` read (the service reads one query's tile once for all three)."""
        if len(q["q"]) != self.num_models or len(g["g"]) != self.num_models:
            raise ValueError(f"dafm: embeddings hold {len(q['q'])}/{len(g['g'])} models, the fused model {self.num_models}")
        b, n = int(q["fp"].shape[0]), int(g["fp"].shape[0])
        h = self.params
        tile = block_rows(n, max(self.num_models, h.hidden), h.tile)
        for s in range(0, b, tile):
            rows = slice(s, min(b, s + tile))
            raw = base_scores(self._bases, [rows_of(x, rows) for x in q["q"]], g["g"], self.score_dtype, self.base_map)
            excl = fingerprint_exclusion(q["fp"][rows], g["fp"]) if h.exclude_reference else None
            with single_thread_if_small(raw.numel()):
                norm = normalise_scores(raw, excl, h.topk, h.beta)
            yield norm

    def similarity(self, q: Any, g: Any) -> torch.Tensor:
        out = []
        for norm in self.normalised_tiles(q, g):
            with single_thread_if_small(norm.z.numel()):
                out.append(self.fusion(norm.z, norm.stats))
        if not out:
            return torch.zeros(0, int(g["fp"].shape[0]))
        return torch.cat(out)

    @torch.no_grad()
    def explain(self, q: Any, g: Any) -> torch.Tensor:
        """``[B, K]`` effective weight of each base model per query (softmax over models: each row sums to 1)."""
        parts = [self.fusion.weights(norm.stats) for norm in self.normalised_tiles(q, g)]
        return torch.cat(parts) if parts else torch.zeros(0, self.num_models)

    @torch.no_grad()
    def contributions(self, q: Any, g: Any, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi [B, K], values [B, 2^K])``: each base model's exact Shapley contribution to the fused score of
        gallery column ``cols[b]`` for query ``b``, and the fused score under every coalition of models (an absent
        model scores every candidate alike; see :mod:`cirfusion.fusion.shapley`). ``phi`` sums to
        ``values[:, -1] - values[:, 0]``, and ``values[:, -1]`` is what :meth:`similarity` gives."""
        check_num_models(self.num_models)
        cols = torch.as_tensor(cols, dtype=torch.int64)
        if cols.shape != (int(q["fp"].shape[0]),):
            raise ValueError(f"dafm: one gallery column per query expected ({int(q['fp'].shape[0])}), got shape "
                             f"{tuple(cols.shape)}")
        h, phis, vals, s = self.params, [], [], 0
        for norm in self.normalised_tiles(q, g):
            n = int(norm.z.shape[0])
            phi, v = shapley_values(self.fusion, norm, cols[s : s + n], h.topk, h.beta)
            phis.append(phi)
            vals.append(v)
            s += n
        if not phis:
            return torch.zeros(0, self.num_models), torch.zeros(0, 1 << self.num_models)
        return torch.cat(phis), torch.cat(vals)

    def stages(self) -> list[Stage]:
        return [Stage("fusion", train=("fusion",))]

    def scale(self) -> torch.Tensor:
        return 1.0 / self.tau

    # ---- persistence: the bases live in sub-directories -----------------------------------------------------------
    def component_dirs(self) -> list[str]:
        return [f"{BASES_DIR}/{i:02d}-{s['name']}" for i, s in enumerate(self.params.bases)]

    def save_components(self, directory: str | Path) -> None:
        """Write each base model's checkpoint into ``directory/bases/NN-NAME`` (called by the checkpoint writer inside
        its temporary directory, so the whole fused checkpoint appears atomically)."""
        for sub, s, b in zip(self.component_dirs(), self.params.bases, self._bases, strict=True):
            d = Path(directory) / sub
            d.mkdir(parents=True, exist_ok=True)
            write_checkpoint_files(b, d, dataset=s.get("dataset"), extra={"dafm_base": s["name"], "source": s.get("source")})

    def load_components(self, directory: str | Path) -> None:
        """Load each base model's weights from its sub-directory; its config must match the fused model's record."""
        for sub, s, b in zip(self.component_dirs(), self.params.bases, self._bases, strict=True):
            d = Path(directory) / sub
            cfg = read_config(d)
            if cfg["method"] != s["method"] or cfg["hparams"] != s["hparams"] or cfg["dims"] != s["dims"]:
                raise CheckpointError(f"{d}: base checkpoint does not match the fused model's record of {s['name']!r} "
                                      f"(method {cfg['method']!r} vs {s['method']!r}, or other hyper-parameters/dims)")
            weights = d / MODEL_FILE
            if not weights.is_file():
                raise CheckpointError(f"{d}: missing {MODEL_FILE}")
            load_state_strict(b, load_weights(weights), weights)
            b.eval()
