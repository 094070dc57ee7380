"""``hf-blip2:<dir or hub id>``: BLIP-2's frozen ViT + Q-Former, as used by SPRC, DetailFusion and FineCIR.

Loaded as transformers' ``Blip2ForImageTextRetrieval`` (checkpoints such as ``Salesforce/blip2-itm-vit-g``): it is the
one BLIP-2 class with both halves of the Q-Former — query tokens reading the ViT (image side) and the Q-Former's
own text embeddings + ``text_projection`` (text side). Generation checkpoints (``blip2-opt-*``, ``blip2-flan-t5-*``)
lack the text side and are refused with a clear error rather than given random text weights.

- Image tokens (default ``tokens=query``): the Q-Former's query outputs [B, num_query_tokens (32), 768] — what
  SPRC/DetailFusion compose. ``tokens=projected``: those queries through ``vision_projection`` and L2-normalised
  (the 256-d ITC space, where BLIP-2 scores an image as the max over its queries). ``tokens=vision``: the ViT's
  patch tokens (large: 257 x 1408 for ViT-g).
- Image global: the mean of the normalised projected queries, L2-normalised (a single-vector stand-in for
  BLIP-2's max-over-queries score).
- Text: the Q-Former text path (``embeddings`` -> Q-Former without queries); tokens = its last hidden states with
  the mask, global = ``text_projection`` of the [CLS] state, L2-normalised — in the projected query space, so the
  backbone is ``aligned``. Texts are truncated at ``max_text_tokens`` (32, BLIP-2's training length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..options import format_options
from . import register_backbone
from ._hf import (
    build_word_tokenizer,
    canonical_location,
    hub_errors,
    hub_kwargs,
    load_image_processor,
    load_pretrained,
    processor_id,
    quiet_transformers,
    run_image_processor,
    tokenizer_id,
    weights_hash,
)
from .base import Backbone, ImageFeatures, TextFeatures

TOKEN_MODES = ("query", "projected", "vision")
# Weights this backbone uses; a checkpoint missing any of them is refused (itm_head is not used).
_USED = ("vision_model.", "query_tokens", "embeddings.", "qformer.", "vision_projection.", "text_projection.")


class HFBlip2Backbone(Backbone):
    aligned = True

    def __init__(self, location: str, tokens: str = "query", max_text_tokens: int = 32) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, Blip2ForImageTextRetrieval  # lazy: heavy, only this backbone needs it

        if tokens not in TOKEN_MODES:
            raise ValueError(f"hf-blip2 backbone: tokens={tokens!r}; expected one of {TOKEN_MODES}")
        self.location = canonical_location(location)
        with hub_errors(self.location, "hf-blip2"):
            config = AutoConfig.from_pretrained(self.location, **hub_kwargs())
        if config.model_type != "blip-2":
            raise ValueError(f"hf-blip2 backbone: {self.location!r} is a {config.model_type!r} checkpoint, not BLIP-2")
        if not getattr(config.qformer_config, "use_qformer_text_input", False):
            raise ValueError(
                f"hf-blip2 backbone: {self.location!r} has no Q-Former text side (qformer_config.use_qformer_text_input "
                "is false); use an image-text retrieval checkpoint such as Salesforce/blip2-itm-vit-g"
            )
        positions = int(config.qformer_config.max_position_embeddings)
        if not (isinstance(max_text_tokens, int) and 1 <= max_text_tokens <= positions):
            raise ValueError(f"hf-blip2 backbone: max_text_tokens={max_text_tokens!r} must be in [1, {positions}]")
        try:
            self.model = load_pretrained(Blip2ForImageTextRetrieval, self.location, "hf-blip2", _USED)
        except ValueError as exc:
            raise ValueError(
                f"{exc}. hf-blip2 needs an image-text retrieval checkpoint with the Q-Former text side "
                "(Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g)"
            ) from exc
        with hub_errors(self.location, "hf-blip2"):
            self.tokenizer = AutoTokenizer.from_pretrained(self.location, **hub_kwargs())
        self.processor = load_image_processor(self.location, self._default_processor)
        self.token_mode = tokens
        self.eval()
        self.max_text_tokens = max_text_tokens

        with torch.inference_mode():
            size = int(config.vision_config.image_size)
            probe = self.encode_image(torch.zeros(1, 3, size, size))
        self.image_dim = int(probe.global_.shape[-1])
        self.num_image_tokens, self.image_token_dim = int(probe.tokens.shape[1]), int(probe.tokens.shape[2])
        self.text_dim = int(config.image_text_hidden_size)
        self.text_token_dim = int(config.qformer_config.hidden_size)

        opts: dict[str, Any] = {}
        if tokens != "query":
            opts["tokens"] = tokens
        if max_text_tokens != 32:
            opts["max_text_tokens"] = max_text_tokens
        self.backbone_id = f"hf-blip2:{self.location}" + (f"?{format_options(opts)}" if opts else "")
        self._weights_hash: str | None = None

    def _default_processor(self) -> Any:
        from transformers import BlipImageProcessorPil  # lazy: heavy, only this backbone needs it

        size = int(self.model.config.vision_config.image_size)
        return BlipImageProcessorPil(size={"height": size, "width": size})

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.location, self.model)
        return self._weights_hash

    def preprocess_id(self) -> str:
        return processor_id(self.processor)

    def text_preprocess_id(self) -> str:
        return f"{tokenizer_id(self.tokenizer)}|max_text_tokens:{self.max_text_tokens}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return run_image_processor(self.processor, image)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        m = self.model
        vit = m.vision_model(pixel_values=pixels.to(self.device, torch.float32)).last_hidden_state
        queries = m.query_tokens.expand(vit.shape[0], -1, -1)
        q = m.qformer(
            query_embeds=queries,
            encoder_hidden_states=vit,
            encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long, device=vit.device),
        ).last_hidden_state
        projected = F.normalize(m.vision_projection(q), dim=-1)
        global_ = F.normalize(projected.mean(1), dim=-1)
        tokens = {"query": q, "projected": projected, "vision": vit}[self.token_mode]
        return ImageFeatures(global_=global_, tokens=tokens.contiguous())

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> TextFeatures:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        m = self.model
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt")
        ids, att = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        hidden = m.qformer(query_embeds=m.embeddings(input_ids=ids), query_length=0, attention_mask=att).last_hidden_state
        global_ = F.normalize(m.text_projection(hidden[:, 0]), dim=-1)
        return TextFeatures(global_=global_, tokens=hidden.contiguous(), mask=att.bool())


@register_backbone("hf-blip2", located=True, options=HFBlip2Backbone)
def create_hf_blip2(location: str, **kw: Any) -> HFBlip2Backbone:
    """``hf-blip2:<location>`` backbone; ``kw`` are :class:`HFBlip2Backbone`'s options (create_backbone checks them)."""
    return HFBlip2Backbone(location, **kw)


def save_tiny_blip2(path: str | Path, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """Write a tiny random BLIP-2 retrieval checkpoint (model, tokenizer, image processor) with ``save_pretrained``,
    for tests and demos of ``hf-blip2:<path>``."""
    from transformers import (  # lazy: heavy, only these helpers need it
        Blip2Config,
        Blip2ForImageTextRetrieval,
        BlipImageProcessorPil,
    )

    path = Path(path)
    tok = build_word_tokenizer(64)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, encoder_hidden_size=32,
                            cross_attention_frequency=1, pad_token_id=0, use_qformer_text_input=True),
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForImageTextRetrieval(cfg)
    with quiet_transformers():
        model.save_pretrained(path)
        tok.save_pretrained(path)
        BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
