"""FineCIR: entity-guided composition from the parsed modification text (arXiv 2503.21309; released code
SDU-L/FineCIR, ``FineCIR.py`` and ``graph_attention.py``), trained on cached backbone features.

The modification text is parsed into a scene graph (:mod:`cirfusion.parse_cache`: once per text, cached). Each
entity becomes a node set ``[entity, attr1, attr2, ...]`` whose node vectors are the backbone's *text encoder*
applied to those words (through the feature cache, so every word is encoded once). One GATv2-style graph-attention
layer runs over each node set (a star: the entity node linked to each attribute, every node to itself) and the
entity node's output is the *entity token*. The entity tokens are appended to ``M`` learned query tokens; with the
modification text's tokens they form one sequence through a small Q-Former (self-attention over the whole sequence;
query and entity positions also cross-attend to the reference image's tokens)::

    nodes_e   = P_n(text_encoder([entity_e, attr_e1, ..., edit_e]))  per entity e (cached, frozen)
    ent_e     = empty + W_o(GATv2(nodes_e, star adjacency)[0])         the entity token
    memory    = [W_g(ref global); W_i(ref tokens) + positions]
    o         = QFormer([Q_1..Q_M; ent_1..ent_E; text tokens], memory)
    q         = norm(head_t(LN(o[M])))                                 output at the first entity position, [B, D]
    G(img)    = norm(head_i(LN(QFormer([Q_1..Q_M], memory(img)))))     M vectors per gallery image, [N, M, D]
    score     = max_m <q, G_m>                                          max-sim over the target's query vectors
    loss      = InfoNCE(score / τ) over in-batch targets                 τ learned (init 0.07, as released)

``entity_guidance=False`` (the ablation) keeps everything else equal: the same sequence layout and read-out
position, with the entity slot holding the learned empty-entity token instead of graph-derived tokens.

What follows the release and what differs (and why):

======================================  ==============================================  ==================================
release (FineCIR.py / graph_attention)   here                                            why
======================================  ==============================================  ==================================
node sets [entity, attrs] + adjacency    same; star adjacency with self-loops              the release's scene_graph_utils is
                                                                                           not published; a star is what a
                                                                                           node set with one entity implies
GraphAttention (GATv2: a·LReLU(W1x_i     same formula, per-head affinity + bias, masked    -
+W2x_j)), residual, LayerNorm, ReLU       softmax, values, residual, LN, ReLU; 1 layer
entity token = node 0 after the GAT      node 0 after the GAT, through a Linear W_o        this Q-Former is pre-norm: an
                                         (init at the learned tokens' scale) plus the      unscaled GAT output (RMS ~0.7
                                         empty-entity token                                against ~0.02) would dominate
                                                                                           the read-out slot (see __init__)
entity tokens appended to 32 queries,    appended to M (default 8) queries; the same       Q-Former is small here (CPU, cached
text tokens in the same Q-Former         Q-Former blocks as SPRC's (BLIP-2 style)          features); BLIP-2's pretrained
                                                                                           Q-Former is not available
node vectors from BLIP-2's text side     the frozen backbone's text encoder (global        methods work on cached features;
                                         vector of each word), projected by a Linear       the backbone is frozen
padded entity slots = zero vectors,      a learned empty-entity token; padded slots        a zero token still attends and is
attended                                 after the first are masked out                    attended: noise for 1-entity texts
composed query = output at position 32   output at position M (the first entity slot)      same rule, other M;
                                         by default; ``readout="token"``: a learned        ``token`` is a variant for the
                                         read-out token at M, the entity slots after it    validation study (docs/finecir.md)
node sets carry no edit                  + the entity's edit word (add/remove/replace/     "add the red square" and "remove
                                         change/keep, ``replaced``): ``edit_nodes=True``   the red square" are opposite
                                         (the default)                                     targets; synthetic val Rmean
                                                                                           60.20 with, 56.93 without
(no places, no old/new split)            ``place_nodes``: the entity's places ("to         variants for the val study,
                                         centre left"); ``new_attribute_nodes``: a         off: no difference on val
                                         change's new values as nodes "now red"            (docs/finecir.md)
target = max over vision_proj(queries)   same (``cosine_or_maxsim``)                      -
InfoNCE, learnable temperature 0.07      same (learned logit scale, init 1/0.07), plus     the shared loop's hard negatives
                                         mined hard negatives when the run asks for them
dropout 0.1 (the Q-Former's BERT config) 0                                                 synthetic val Rmean, 3 epochs:
                                                                                           56.93 against 53.67 (58.33
                                                                                           against 53.33 without entities)
parser: not released                     :mod:`cirfusion.parsing` by default (any          -
                                         registered parser, ``parser=``)
======================================  ==============================================  ==================================

Checkpoints written before ``entity_out`` existed (the rescaling) are refused on load, naming the missing weights;
retrain them.

Feature access: the entity words need the raw texts and an encoder; :class:`~cirfusion.backbones.base.TextFeatures`
built from a feature table or by ``cirfusion.load`` carry both (``texts``, ``encoder``). Features built by hand carry
neither: then no entity can be read, every query gets the empty-entity token, and a :class:`FineCIRWarning` says so
once per model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import ImageFeatures, TextFeatures
from ..parse_cache import ParseCache, entity_node_sets, get_parser
from .base import CIRMethod, HyperParameterError, MethodDims, hparam, l2norm, trim_text_padding
from .registry import register_method
from .sprc import QFormerBlock


class FineCIRWarning(UserWarning):
    """Entity guidance could not be applied (the text features carry no raw texts or no encoder)."""


class GraphAttention(nn.Module):
    """One GATv2-style layer as in the release's ``graph_attention.py``: per head, the affinity of node i to node j
    is ``a_h · LeakyReLU(W1 x_i + W2 x_j) + b_h`` (masked where ``adj`` is 0, softmax over j), the output
    ``ReLU(LN(W1 x + Σ_j α_ij W_v x_j))`` (the residual variant)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise HyperParameterError(f"finecir: width {width} is not divisible by gat_heads {heads}")
        self.heads = heads
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.fc_val = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))
        self.aff = nn.Parameter(torch.empty(heads, width // heads))
        self.aff_bias = nn.Parameter(torch.empty(heads))
        self.norm = nn.LayerNorm(width)
        for h in range(heads):
            nn.init.kaiming_uniform_(self.aff[h : h + 1], a=math.sqrt(5))
        bound = 1 / math.sqrt(width // heads)
        nn.init.uniform_(self.aff_bias, -bound, bound)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """``x`` [G, n, W] node vectors, ``adj`` [G, n, n] (nonzero = edge) -> [G, n, W]."""
        g, n, w = x.shape
        h, dh = self.heads, w // self.heads
        a = self.fc1(x).view(g, n, h, dh).transpose(1, 2)  # [G, h, n, dh]
        b = self.fc2(x).view(g, n, h, dh).transpose(1, 2)
        v = self.fc_val(x).view(g, n, h, dh).transpose(1, 2)
        e = F.leaky_relu(a[:, :, :, None, :] + b[:, :, None, :, :], negative_slope=0.2)  # [G, h, n, n, dh]
        aff = (e * self.aff[None, :, None, None, :]).sum(-1) + self.aff_bias[None, :, None, None]
        aff = aff.masked_fill((adj < 1e-5)[:, None], -1e9).softmax(dim=-1)
        out = (aff @ v).transpose(1, 2).reshape(g, n, w)
        return F.relu(self.norm(a.transpose(1, 2).reshape(g, n, w) + out))


@dataclass
class FineCirParams:
    """FineCIR's hyper-parameters."""

    embed_dim: int = hparam(256, "D")
    width: int = hparam(128, "Q-Former width")
    layers: int = hparam(2, "Q-Former blocks (shared by the query and gallery passes)")
    heads: int = hparam(4, "Q-Former attention heads")
    num_queries: int = hparam(8, "M learned query tokens = gallery vectors per image (the release: 32)")
    max_entities: int = hparam(4, "entity tokens per text at most (the first ones of the parse)")
    max_attributes: int = hparam(4, "attribute nodes per entity at most")
    gat_heads: int = hparam(4, "graph-attention heads (the release: 16 at width 768)")
    dropout: float = hparam(0.0, "dropout (the release: 0.1, BLIP-2's; 0 chosen on val, see docs/finecir.md)")
    entity_guidance: bool = hparam(True, "entity tokens from the parsed graph; false: the empty-entity token only (ablation)")
    readout: str = hparam("entity", "where the composed query is read: 'entity' (the first entity slot, as released) or "
                          "'token' (a learned read-out token before the entity slots; not in the release)")
    edit_nodes: bool = hparam(True, "each entity's edit (add/remove/replace/change/keep, or 'replaced' for a replace's "
                              "old entity) is one more node of its set (not in the release; chosen on val)")
    place_nodes: bool = hparam(False, "each entity's place phrases ('in top left corner', 'to centre left') are nodes of "
                               "its set (not in the release)")
    new_attribute_nodes: bool = hparam(False, "the values a change edit gives an entity are nodes of their own ('now red'), "
                                       "apart from the attributes that identify it (not in the release)")
    parser: str = hparam("cirfusion", "registered parser that turns a text into its scene graph (parse_cache)")
    logit_scale_init: float = hparam(1 / 0.07, "initial InfoNCE logit scale = 1/temperature (learned; the release: 0.07)")


@register_method("finecir")
class FineCIR(CIRMethod):
    """FineCIR: entity tokens from the parsed modification (GATv2 over [entity, attributes] node sets) appended to
    Q-Former query tokens that, with the text, cross-attend to the reference; max-sim to the target's query vectors.
    See the module docstring."""

    Params = FineCirParams
    params: FineCirParams

    def __init__(self, dims: MethodDims, **hparams: object) -> None:
        super().__init__(dims, **hparams)
        h = self.params
        if dims.num_image_tokens < 1 or dims.max_text_tokens < 1:
            raise HyperParameterError(f"method {self.method_name!r} needs image and text tokens; backbone "
                                      f"{dims.backbone_id or '<unknown>'!r} has {dims.num_image_tokens} and {dims.max_text_tokens}")
        for name in ("num_queries", "max_entities", "layers"):
            if getattr(h, name) < 1:
                raise HyperParameterError(f"{self.method_name}: {name} must be >= 1, got {getattr(h, name)}")
        if h.max_attributes < 0:
            raise HyperParameterError(f"{self.method_name}: max_attributes must be >= 0, got {h.max_attributes}")
        w = h.width
        if w % h.heads:
            raise HyperParameterError(f"{self.method_name}: width {w} is not divisible by heads {h.heads}")
        self.uses_image_tokens = self.uses_text_tokens = True
        self.num_queries = h.num_queries
        self.image_in = nn.Linear(dims.image_token_dim, w)
        self.image_global_in = nn.Linear(dims.image_dim, w)
        self.image_pos = nn.Parameter(torch.zeros(1, dims.num_image_tokens, w))
        self.text_in = nn.Linear(dims.text_token_dim, w)
        self.text_pos = nn.Parameter(torch.zeros(1, dims.max_text_tokens, w))
        self.queries = nn.Parameter(torch.zeros(1, h.num_queries, w))
        self.empty_entity = nn.Parameter(torch.zeros(1, w))
        for p in (self.image_pos, self.text_pos, self.queries, self.empty_entity):
            nn.init.trunc_normal_(p, std=0.02)
        self.node_in = nn.Linear(dims.text_dim, w)
        self.gat = GraphAttention(w, h.gat_heads, h.dropout)
        self.qformer = nn.ModuleList(QFormerBlock(w, h.heads, h.dropout) for _ in range(h.layers))
        self.norm_query, self.norm_image = nn.LayerNorm(w), nn.LayerNorm(w)
        self.text_head, self.image_head = nn.Linear(w, h.embed_dim), nn.Linear(w, h.embed_dim)
        self.init_logit_scale(h.logit_scale_init)
        # The GAT ends in ReLU(LN(.)): entity tokens of RMS ~0.7 against ~0.02 for the learned tokens and ~0.2 for the
        # text's. In this pre-norm Q-Former (BLIP-2's is post-norm, which rescales every token after every sublayer)
        # such a token stays dominated by its own words, and the read-out is the first entity slot. So an entity
        # enters as ``empty_entity + entity_out(GAT output)``, entity_out initialised at the learned tokens' scale.
        # Created last, so that every other initial weight is the same with or without it.
        self.entity_out = nn.Linear(w, w)
        nn.init.trunc_normal_(self.entity_out.weight, std=0.02)
        nn.init.zeros_(self.entity_out.bias)
        if h.readout not in ("entity", "token"):
            raise HyperParameterError(f"{self.method_name}: readout must be 'entity' or 'token', got {h.readout!r}")
        if h.readout == "token":
            self.readout_token = nn.Parameter(torch.zeros(1, 1, w))
            nn.init.trunc_normal_(self.readout_token, std=0.02)
        # Not state: per-process caches of parses and of the frozen encoder's word vectors.
        self._parses: ParseCache | None = None
        self._node_memo: dict[str, torch.Tensor] = {}
        self._warned = False

    # ---- entities -----------------------------------------------------------------------------------------------
    def node_sets(self, texts: list[str], cache_dir: Path | None = None) -> list[list[list[str]]]:
        """Per text, its node sets ``[[entity, attr, ...], ...]`` (parsed once per text, cached)."""
        if self._parses is None or (cache_dir is not None and self._parses.dir is None):
            self._parses = ParseCache(get_parser(self.params.parser), cache_dir)
        return [self.node_sets_of(g) for g in self._parses.graphs(texts)]

    def node_sets_of(self, graph: dict[str, Any]) -> list[list[str]]:
        """One parsed graph's node sets, as this model's hyper-parameters build them."""
        h = self.params
        return entity_node_sets(graph, h.max_entities, h.max_attributes, h.edit_nodes, h.place_nodes, h.new_attribute_nodes)

    def explain_query(self, q: Any, text: str) -> dict[str, Any]:
        """The service's explanation of one query (``cirfusion.serve``): the scene graph parsed from its text and
        the entity node sets that guided the composition."""
        if self._parses is None:
            self._parses = ParseCache(get_parser(self.params.parser), None)
        graph = self._parses.graphs([text])[0]
        return {"kind": "branches", "method": self.method_name or "finecir",
                "label": "the modification parsed into a scene graph; its entities (with their attributes) guide how "
                         "the reference image is composed with the text",
                "parsed": graph,
                "entities_used": self.node_sets_of(graph)}

    def _node_vectors(self, words: list[str], encoder: Any) -> dict[str, torch.Tensor]:
        todo = [w for w in dict.fromkeys(words) if w not in self._node_memo]
        if todo:
            with torch.no_grad():
                got = encoder(todo).global_.float()
            if got.shape != (len(todo), self.dims.text_dim):
                raise ValueError(f"{self.method_name}: the text encoder gave word vectors of shape {tuple(got.shape)}, "
                                 f"expected [{len(todo)}, {self.dims.text_dim}]")
            self._node_memo.update({w: got[i] for i, w in enumerate(todo)})
        return self._node_memo

    def entity_tokens(self, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(entity slots [B, E, W], padding mask [B, E], True = ignore). Slot 0 always exists (the read-out)."""
        b = text.global_.shape[0]
        dev = text.global_.device
        sets: list[list[list[str]]] = [[] for _ in range(b)]
        if self.params.entity_guidance:
            if text.texts is None or text.encoder is None:
                if not self._warned:
                    warnings.warn(f"{self.method_name}: these text features carry no raw texts or no encoder, so no "
                                  "entity can be read; every query uses the empty-entity token", FineCIRWarning, stacklevel=3)
                    self._warned = True
            else:
                if len(text.texts) != b:
                    raise ValueError(f"{self.method_name}: {len(text.texts)} raw texts for {b} text feature rows")
                cache_dir = getattr(getattr(text.encoder, "__self__", None), "cache_dir", None)
                sets = self.node_sets(list(text.texts), cache_dir)
        e = max(1, max((len(s) for s in sets), default=0))
        slots = self.empty_entity.expand(b, e, -1).clone()
        pad = torch.ones(b, e, dtype=torch.bool, device=dev)
        pad[:, 0] = False
        flat = [(i, j, ns) for i, s in enumerate(sets) for j, ns in enumerate(s)]
        if flat:
            memo = self._node_vectors([w for _, _, ns in flat for w in ns], text.encoder)
            n = max(len(ns) for _, _, ns in flat)
            x = torch.zeros(len(flat), n, self.dims.text_dim, device=dev)
            real = torch.zeros(len(flat), n, dtype=torch.bool, device=dev)
            for k, (_, _, ns) in enumerate(flat):
                x[k, : len(ns)] = torch.stack([memo[w] for w in ns]).to(dev)
                real[k, : len(ns)] = True
            star = torch.zeros(n, n, dtype=torch.bool, device=dev)
            star[0, :], star[:, 0] = True, True
            star |= torch.eye(n, dtype=torch.bool, device=dev)
            adj = (star[None] & real[:, :, None] & real[:, None, :]).float()
            ent = self.empty_entity + self.entity_out(self.gat(self.node_in(x), adj)[:, 0])
            rows = torch.tensor([i for i, _, _ in flat], device=dev)
            cols = torch.tensor([j for _, j, _ in flat], device=dev)
            slots = slots.index_put((rows, cols), ent.to(slots.dtype))
            pad = pad.index_put((rows, cols), torch.zeros(len(flat), dtype=torch.bool, device=dev))
        return slots, pad

    # ---- Q-Former -----------------------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, key_pad: torch.Tensor | None, memory: torch.Tensor, n_query: int) -> torch.Tensor:
        for block in self.qformer:
            x = block(x, key_pad, memory, n_query)
        return x

    def memory(self, img: ImageFeatures) -> torch.Tensor:
        tok = img.tokens.float()
        if tok.dim() != 3 or tok.shape[1] != self.dims.num_image_tokens:
            raise ValueError(f"{self.method_name} expects {self.dims.num_image_tokens} image tokens, got shape {tuple(tok.shape)}")
        return torch.cat([self.image_global_in(img.global_.float())[:, None], self.image_in(tok) + self.image_pos], dim=1)

    # ---- the contract -------------------------------------------------------------------------------------------
    def encode_query(self, ref: ImageFeatures, text: TextFeatures) -> torch.Tensor:
        ent, ent_pad = self.entity_tokens(text)
        t = trim_text_padding(text)
        length = t.tokens.shape[1]
        if length > self.dims.max_text_tokens:
            raise ValueError(f"{self.method_name}: {length} text tokens, the backbone gives at most {self.dims.max_text_tokens}")
        tok = self.text_in(t.tokens.float()) + self.text_pos[:, :length]
        b, m = tok.shape[0], self.num_queries
        lead = self.queries.expand(b, -1, -1)
        if self.params.readout == "token":  # read at position M, the entity slots after it
            lead = torch.cat([lead, self.readout_token.expand(b, -1, -1)], dim=1)
        x = torch.cat([lead, ent, tok], dim=1)
        n_lead = lead.shape[1]
        key_pad = torch.cat([torch.zeros(b, n_lead, dtype=torch.bool, device=tok.device), ent_pad, ~t.mask.bool()], dim=1)
        out = self._run(x, key_pad, self.memory(ref), n_lead + ent.shape[1])
        return l2norm(self.text_head(self.norm_query(out[:, m])))

    def encode_gallery(self, img: ImageFeatures) -> torch.Tensor:
        mem = self.memory(img)
        out = self._run(self.queries.expand(mem.shape[0], -1, -1), None, mem, self.num_queries)
        return l2norm(self.image_head(self.norm_image(out)))  # [N, M, D]
