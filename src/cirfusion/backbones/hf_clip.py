"""``hf-clip:<dir or hub id>``: CLIP and SigLIP dual encoders through transformers (``aligned=True``).

- Global vectors: the models' projected embeddings (``get_image_features`` / ``get_text_features``), L2-normalised —
  image and text share one space, which enables the zero-shot ``sum`` baseline.
- Image tokens: the vision tower's last hidden states over the patches (CLS excluded; SigLIP has none), i.e. a
  (image_size/patch)^2 grid. ``tokens=projected`` (CLIP only) maps every patch through CLIP's post-layernorm and
  visual projection into the joint space (dense-CLIP style); the default ``hidden`` keeps the raw hidden states.
- Text tokens: the text tower's last hidden states with the tokenizer's mask. The global text vector is computed on
  the full tokenization (CLIP: up to 77 tokens, SigLIP: padded to its fixed 64 as it was trained); ``max_text_tokens``
  only caps how many token features are kept.
- Preprocessing: the checkpoint's own image processor (transformers' Pillow backend; no torchvision needed).
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

FAMILIES = ("clip", "siglip")
TOKEN_MODES = ("hidden", "projected")


class HFClipBackbone(Backbone):
    aligned = True

    def __init__(self, location: str, tokens: str = "hidden", max_text_tokens: int | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel  # lazy: heavy, only this backbone needs it

        if tokens not in TOKEN_MODES:
            raise ValueError(f"hf-clip backbone: tokens={tokens!r}; expected one of {TOKEN_MODES}")
        self.location = canonical_location(location)
        with hub_errors(self.location, "hf-clip"):
            config = AutoConfig.from_pretrained(self.location, **hub_kwargs())
        self.family = config.model_type
        if self.family not in FAMILIES:
            raise ValueError(
                f"hf-clip backbone: {self.location!r} is a {self.family!r} checkpoint; expected one of {FAMILIES}"
            )
        if self.family == "siglip" and tokens == "projected":
            raise ValueError("hf-clip backbone: tokens=projected needs CLIP (SigLIP has no per-token projection)")
        cls = CLIPModel if self.family == "clip" else SiglipModel
        self.model = load_pretrained(cls, self.location, "hf-clip")
        with hub_errors(self.location, "hf-clip"):
            self.tokenizer = AutoTokenizer.from_pretrained(self.location, **hub_kwargs())
        self.processor = load_image_processor(self.location, self._default_processor)
        self.token_mode = tokens
        self.eval()

        tcfg = config.text_config
        self.text_positions = int(tcfg.max_position_embeddings)
        if max_text_tokens is not None and not (isinstance(max_text_tokens, int) and 1 <= max_text_tokens <= self.text_positions):
            raise ValueError(f"hf-clip backbone: max_text_tokens={max_text_tokens!r} must be in [1, {self.text_positions}]")
        self.max_text_tokens = max_text_tokens or self.text_positions
        with torch.inference_mode():
            probe = self.encode_image(torch.zeros(1, 3, *self._input_hw()))
        self.image_dim = int(probe.global_.shape[-1])
        self.num_image_tokens, self.image_token_dim = int(probe.tokens.shape[1]), int(probe.tokens.shape[2])
        self.text_dim = self.image_dim
        self.text_token_dim = int(tcfg.hidden_size)

        opts: dict[str, Any] = {}
        if tokens != "hidden":
            opts["tokens"] = tokens
        if max_text_tokens is not None and max_text_tokens != self.text_positions:
            opts["max_text_tokens"] = max_text_tokens
        self.backbone_id = f"hf-clip:{self.location}" + (f"?{format_options(opts)}" if opts else "")
        self._weights_hash: str | None = None

    def _default_processor(self) -> Any:
        from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil  # lazy: heavy, only this backbone needs it

        size = int(self.model.config.vision_config.image_size)
        if self.family == "clip":
            return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return SiglipImageProcessorPil(size={"height": size, "width": size})

    def _input_hw(self) -> tuple[int, int]:
        size = int(self.model.config.vision_config.image_size)
        return size, size

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.location, self.model)
        return self._weights_hash

    def preprocess_id(self) -> str:
        return processor_id(self.processor)

    def text_preprocess_id(self) -> str:
        pad = "max_length" if self.family == "siglip" else "longest"
        return f"{tokenizer_id(self.tokenizer)}|pad:{pad}|positions:{self.text_positions}|max_text_tokens:{self.max_text_tokens}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return run_image_processor(self.processor, image)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        out = self.model.vision_model(pixel_values=pixels.to(self.device, torch.float32))
        hidden = out.last_hidden_state
        if self.family == "clip":
            global_ = self.model.visual_projection(out.pooler_output)
            patches = hidden[:, 1:]
            if self.token_mode == "projected":
                patches = self.model.visual_projection(self.model.vision_model.post_layernorm(patches))
        else:
            global_ = out.pooler_output  # SigLIP: attention-pooling head over post-layernormed patches
            patches = hidden
        return ImageFeatures(global_=F.normalize(global_, dim=-1), tokens=patches.contiguous())

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> TextFeatures:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        if self.family == "siglip":
            # SigLIP was trained on max-length padding without a mask; its pooled output is the last position.
            enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.text_positions, return_tensors="pt")
            out = self.model.text_model(input_ids=enc["input_ids"].to(self.device))
            global_ = out.pooler_output
        else:
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.text_positions, return_tensors="pt")
            out = self.model.text_model(input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device))
            global_ = self.model.text_projection(out.pooler_output)
        mask = enc["attention_mask"].to(self.device).bool()
        L = min(self.max_text_tokens, mask.shape[1])
        return TextFeatures(
            global_=F.normalize(global_, dim=-1),
            tokens=out.last_hidden_state[:, :L].contiguous(),
            mask=mask[:, :L].contiguous(),
        )


@register_backbone("hf-clip", located=True, options=HFClipBackbone)
def create_hf_clip(location: str, **kw: Any) -> HFClipBackbone:
    """``hf-clip:<location>`` backbone; ``kw`` are :class:`HFClipBackbone`'s options (create_backbone checks them)."""
    return HFClipBackbone(location, **kw)


def save_tiny_clip(path: str | Path, family: str = "clip", seed: int = 0) -> Path:
    """Write a tiny random CLIP or SigLIP checkpoint (model, tokenizer, image processor) with ``save_pretrained``.

    For tests and demos: ``create_backbone(f"hf-clip:{path}")`` then runs the exact code a real checkpoint runs.
    """
    from transformers import (  # lazy: heavy, only these helpers need it
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
    )

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; expected one of {FAMILIES}")
    path = Path(path)
    positions = 16
    tok = build_word_tokenizer(positions)
    common_text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=positions, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    common_vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    cfg: Any
    model: Any
    proc: Any
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "clip":
            cfg = CLIPConfig(text_config=common_text, vision_config=common_vision, projection_dim=24)
            model = CLIPModel(cfg)
            proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        else:
            cfg = SiglipConfig(text_config={**common_text, "projection_size": 32}, vision_config=common_vision)
            model = SiglipModel(cfg)
            proc = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    with quiet_transformers():
        model.save_pretrained(path)
        tok.save_pretrained(path)
        proc.save_pretrained(path)
    return path
