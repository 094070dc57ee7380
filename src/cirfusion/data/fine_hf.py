"""The make-fine generator from local model directories via transformers (step 2 of the FineCIR annotation
pipeline, see :mod:`cirfusion.data.fine`): an image-text-to-text model drafts the fine text from the target image and
the coarse text, and a causal LLM rewrites the draft as numbered atomic edits, keeping only edits the coarse text
supports. Both are loaded with ``local_files_only`` (never downloaded) and decode greedily (deterministic).

``save_tiny_generator(dir)`` writes tiny random models of both kinds (BLIP-2 with an OPT decoder, GPT-2) for tests
and demos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..backbones._hf import build_word_tokenizer, quiet_transformers
from .fine import FineDataError
from .images import load_image

DRAFT_PROMPT = ("The reference image was changed as follows: {coarse}. Describe the target image's differences as "
                "a numbered list of atomic edits (add, remove, replace, change, keep). Answer:")
CLEAN_PROMPT = ("Instruction: {coarse}\nDraft edits: {draft}\nRewrite the draft as a numbered list of atomic edits. "
                "Keep only edits the instruction supports; drop any invented detail.\nEdits: 1.")


def _strip_prompt(out: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The generated tokens without the prompt, when the model echoes it (decoder-only models do)."""
    n = prompt_ids.shape[1]
    if out.shape[1] >= n and torch.equal(out[:, :n], prompt_ids):
        return out[:, n:]
    return out


class HFFineGenerator:
    """``draft`` with an image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``), ``clean``
    with a causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer``), both from local directories."""

    def __init__(self, vlm_dir: str | Path, llm_dir: str | Path, max_new_tokens: int = 96, device: str = "cpu",
                 min_new_tokens: int = 1) -> None:
        from transformers import (  # lazy: heavy, only make-fine's generator needs it
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        for what, d in (("image-text-to-text model", vlm_dir), ("LLM", llm_dir)):
            if not Path(d).is_dir():
                raise FineDataError(f"make-fine: the {what} directory {d} does not exist (models are read from local "
                                    "directories only)")
        vlm_cls: Any = AutoModelForImageTextToText  # (its from_pretrained is typed for instances)
        llm_cls: Any = AutoModelForCausalLM
        with quiet_transformers():
            self.processor = AutoProcessor.from_pretrained(str(vlm_dir), local_files_only=True)
            self.vlm: Any = vlm_cls.from_pretrained(str(vlm_dir), local_files_only=True)
            self.vlm.to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
            self.llm: Any = llm_cls.from_pretrained(str(llm_dir), local_files_only=True)
            self.llm.to(device).eval()
        self.max_new_tokens, self.min_new_tokens, self.device = max_new_tokens, min_new_tokens, device

    @torch.no_grad()
    def draft(self, reference: Path, target: Path, coarse: str) -> str:
        inputs = self.processor(images=[load_image(target)], text=[DRAFT_PROMPT.format(coarse=coarse)], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.vlm.generate(**inputs, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, do_sample=False)
        return str(self.processor.batch_decode(_strip_prompt(out, inputs["input_ids"]), skip_special_tokens=True)[0]).strip()

    @torch.no_grad()
    def clean(self, draft: str, coarse: str) -> str:
        enc = self.tokenizer([CLEAN_PROMPT.format(coarse=coarse, draft=draft)], return_tensors="pt").to(self.device)
        out = self.llm.generate(**enc, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id)
        text = str(self.tokenizer.batch_decode(_strip_prompt(out, enc["input_ids"]), skip_special_tokens=True)[0]).strip()
        return "1. " + text if text and not text[0].isdigit() else text


def save_tiny_generator(path: str | Path, words: list[str] | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Tiny random models for tests: ``path/vlm`` (BLIP-2 + OPT, with its processor) and ``path/llm`` (GPT-2)."""
    from transformers import (  # lazy: heavy, only this helper needs it
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
        GPT2Config,
        GPT2LMHeadModel,
    )

    path = Path(path)
    vocab = words or ("1 2 3 . add remove replace change keep make the a an with to of in on left right red blue "
                      "green black white dress shirt circle square image edits answer instruction draft").split()
    tok: Any = build_word_tokenizer(256, vocab)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.image_token = "<image>"
    n = len(tok)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=n, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, cross_attention_frequency=1),
        text_config=dict(model_type="opt", vocab_size=n, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                         word_embed_proj_dim=32, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vlm = Blip2ForConditionalGeneration(cfg)
        llm = GPT2LMHeadModel(GPT2Config(vocab_size=n, n_positions=512, n_embd=32, n_layer=1, n_head=2,
                                         bos_token_id=2, eos_token_id=3, pad_token_id=0))
    with quiet_transformers():
        vlm.save_pretrained(path / "vlm")
        Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                       num_query_tokens=4).save_pretrained(path / "vlm")
        llm.save_pretrained(path / "llm")
        tok.save_pretrained(path / "llm")
    return path / "vlm", path / "llm"
