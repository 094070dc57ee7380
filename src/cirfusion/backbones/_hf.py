"""Shared plumbing for the transformers-based backbones (``hf-clip``, ``hf-blip2``).

A location is a local directory (written by ``save_pretrained``) or a hub id. Every transformers load runs with
``local_files_only=True`` unless downloads were allowed (``create_backbone(..., allow_download=True)``, CLI
``--allow-download``): a hub id is then read from the local Hugging Face cache only, and one that is not there is a
clear error rather than a download.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import BackboneAccessError, downloads_allowed
from ._util import files_sha256, short_hash, state_dict_sha256

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def canonical_location(location: str | os.PathLike[str]) -> str:
    """Absolute path for an existing directory (so the id means the same from any working dir), else the hub id."""
    p = Path(location).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if str(location).startswith((".", "/", "~")) or str(location).count("/") > 1:
        # A path, not a hub id ("org/name"): a clear error beats a confusing hub lookup.
        raise FileNotFoundError(f"backbone location {location!r}: no such directory")
    return str(location)


def hub_kwargs() -> dict[str, Any]:
    """Keyword arguments for every ``from_pretrained`` call: no network unless downloads were allowed."""
    return {"local_files_only": not downloads_allowed()}


@contextlib.contextmanager
def hub_errors(location: str, what: str) -> Iterator[None]:
    """Turn transformers' "not found" for a hub id that is not cached (downloads off) into a one-line error."""
    try:
        yield
    except OSError as exc:
        if downloads_allowed() or Path(location).is_dir():
            raise
        raise BackboneAccessError(
            f"{what} backbone: {location!r} is not a local directory and is not in the local Hugging Face cache; "
            "downloads are off: pass --allow-download (API: allow_download=True) to fetch it, or give a directory "
            f"written by save_pretrained ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
        ) from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-tensor "Loading weights" bars or config chatter from transformers inside; restores its settings."""
    from transformers.utils import logging as hf_logging  # lazy: heavy, only the hf backbones need it

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(model_cls: Any, location: str, what: str, required_prefixes: Iterable[str] | None = None) -> Any:
    """``model_cls.from_pretrained`` in float32, refusing a checkpoint that lacks weights we use (never a silent
    random init). ``required_prefixes``: only missing keys under these prefixes are errors (None: any)."""
    with quiet_transformers(), hub_errors(location, what):
        model, info = model_cls.from_pretrained(location, dtype=torch.float32, output_loading_info=True, **hub_kwargs())
    prefixes = tuple(required_prefixes) if required_prefixes is not None else None
    missing = [k for k in info.get("missing_keys", []) if prefixes is None or k.startswith(prefixes)]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        detail = []
        if missing:
            detail.append(f"missing weights {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")
        if mismatched:
            detail.append(f"shape-mismatched weights {mismatched[:4]}")
        raise ValueError(f"{what} checkpoint {location!r} cannot be used: {'; '.join(detail)}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weights_hash(location: str, model: torch.nn.Module) -> str:
    """Local directory: hash of its weight files and config (memoised by path, size and mtime).
    Hub id: hash of the loaded state dict (the files live in the hub cache, whose layout we do not rely on)."""
    p = Path(location)
    if p.is_dir():
        files = sorted({f for pat in WEIGHT_PATTERNS for f in p.glob(pat)} | {f for f in [p / "config.json"] if f.is_file()})
        if any(f.suffix in (".safetensors", ".bin") for f in files):
            return files_sha256(files, p)[:32]
    return state_dict_sha256(model.state_dict())[:32]


def load_image_processor(location: str, fallback: Any) -> Any:
    """The checkpoint's image processor (Pillow backend: torchvision is not needed); ``fallback()`` builds the
    family's standard one from the model config when the directory has no ``preprocessor_config.json``."""
    from transformers import AutoImageProcessor  # lazy: heavy, only the hf backbones need it

    p = Path(location)
    if p.is_dir() and not (p / "preprocessor_config.json").is_file():
        return fallback()
    with hub_errors(location, "image processor of the"):
        return AutoImageProcessor.from_pretrained(location, backend="pil", **hub_kwargs())


def processor_id(processor: Any) -> str:
    """Preprocessing identity: processor class + its configuration (sorted JSON)."""
    cfg = json.loads(processor.to_json_string())
    cfg.pop("processor_class", None)
    return f"{type(processor).__name__}:{short_hash(json.dumps(cfg, sort_keys=True))}"


def run_image_processor(processor: Any, image: Image.Image) -> torch.Tensor:
    out = processor(images=[image.convert("RGB")], return_tensors="pt")
    return out["pixel_values"][0].to(torch.float32)


def tokenizer_id(tokenizer: Any) -> str:
    """Text preprocessing identity: tokenizer class + the hash of its serialized vocabulary/rules."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return f"{type(tokenizer).__name__}:{short_hash(body)}"


# --- tiny random checkpoints (tests, demos): the same loading code as a real checkpoint, in milliseconds ---

TINY_WORDS = (
    "a an the is are of on in to with and or make it same but change add remove replace move left right top bottom "
    "small large big red green blue yellow black white purple orange pink brown grey gray circle square triangle star "
    "cross dress shirt skirt hat shoes pants shorts photo image picture color colour shape size more less instead"
).split()


def build_word_tokenizer(model_max_length: int, words: Iterable[str] = TINY_WORDS) -> Any:
    """A small offline word-level tokenizer, BERT-style specials: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 (+ [MASK]=4)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # lazy: as transformers
    from transformers import PreTrainedTokenizerFast  # lazy: heavy, only the hf backbones need it

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[CLS]",
        eos_token="[SEP]",
        model_max_length=model_max_length,
    )
