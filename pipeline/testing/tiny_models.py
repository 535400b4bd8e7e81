"""Tiny random-init models for the tiny recipe and the tests: a Llama pair with a byte-level BPE tokenizer trained
on a corpus (`specialist tiny-models`), and one small model per architecture family with that family's real
tokenizer, rebuilt offline from the reference vocabularies llama.cpp ships (tests/test_architectures.py).

Apart from pipeline/models.py so that an edit to how models load does not rebuild the tiny models.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

TINY_SIZES = {
    # name: (hidden, layers, heads, kv heads, intermediate)
    "base": (64, 2, 4, 2, 128),
    "reference": (128, 4, 4, 2, 256),
}


def build_tiny_models(corpus: list[str], out_dir: Path, vocab_size: int = 512, seed: int = 0) -> dict[str, Path]:
    """Train a byte-level BPE tokenizer on `corpus` and save one random-init Llama per TINY_SIZES entry."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")

    paths = {}
    for name, (hidden, layers, heads, kv_heads, intermediate) in TINY_SIZES.items():
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            # Wider init than Llama's 0.02: with frozen tied embeddings that small, logits cannot exceed
            # about 1.3 and LoRA alone could never make the model confident about anything.
            initializer_range=0.2,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        paths[name] = out_dir / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


class TinyArchitecture(NamedTuple):
    """A model family the architecture tests cover, as a tiny random-init model with the family's tokenizer."""

    model_type: str  # transformers' config model_type
    vocab: str  # llama.cpp's reference vocabulary (llamacpp_install.VOCABS)
    sentencepiece: bool  # the vocabulary is a SentencePiece one (else byte-level BPE)
    dummy_prefix: bool = True  # SentencePiece adds a space before the text (Llama 2, Mistral) or not (Gemma)
    config: tuple[tuple[str, object], ...] = ()  # the family's own settings


TINY_ARCHITECTURES = {
    "llama": TinyArchitecture("llama", "llama-spm", True),  # Llama 2's SentencePiece tokenizer
    "llama3": TinyArchitecture("llama", "llama-bpe", False),  # Llama 3's byte-level BPE
    "mistral": TinyArchitecture("mistral", "llama-spm", True),
    "qwen2": TinyArchitecture("qwen2", "qwen2", False),
    "qwen3": TinyArchitecture("qwen3", "qwen2", False),  # Qwen3 keeps Qwen2's tokenizer
    "phi3": TinyArchitecture("phi3", "phi-3", True),
    # Gemma's own 262k-piece vocabulary is not among llama.cpp's reference files in a form transformers reads:
    # Llama 2's pieces stand in, as Gemma uses them (SentencePiece, no dummy prefix); the architecture is Gemma 3's,
    # whose released sizes scale attention by head_dim as llama.cpp assumes
    "gemma3": TinyArchitecture("gemma3_text", "llama-spm", True, False, (("query_pre_attn_scalar", 16),)),
}


def build_tiny_architecture(family: str, vocab_gguf: Path, out_dir: Path, seed: int = 0) -> Path:
    """A random-init model of `family` (2 layers, width 64) with that family's real tokenizer, rebuilt offline from
    llama.cpp's reference vocabulary (a vocab-only GGUF): a SentencePiece model file (tokenizer.model, from the
    file's pieces, scores and types) for the SentencePiece families, transformers' own GGUF tokenizer conversion
    for the byte-level BPE ones. What llama.cpp's converter and tokenizer meet in a real model of the family."""
    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers import AutoConfig, AutoModelForCausalLM, GemmaTokenizer, LlamaTokenizer

    architecture = TINY_ARCHITECTURES[family]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = 0  # the family's embedding rows where they exceed its tokens (Phi-3 has 32,064 for 32,011)
    if architecture.sentencepiece:
        reader = GGUFReader(str(vocab_gguf))  # (a BPE vocabulary's merges take gguf's reader half a minute)
        tokens = _gguf_values(reader, "tokenizer.ggml.tokens")
        add_bos = bool(_gguf_values(reader, "tokenizer.ggml.add_bos_token")[0][0])
        with tempfile.TemporaryDirectory() as scratch:  # the model file alone: no earlier tokenizer.json wins
            model_file = Path(scratch) / "tokenizer.model"
            added, special = _sentencepiece_model(reader, model_file, architecture.dummy_prefix)
            # Gemma's tokenizer class is the one that reads a model file without a dummy prefix as it is
            tokenizer = (LlamaTokenizer if architecture.dummy_prefix else GemmaTokenizer).from_pretrained(
                scratch, add_bos_token=add_bos, pad_token=special["eos_token"], mask_token=None, **special
            )
            shutil.copyfile(model_file, out_dir / "tokenizer.model")  # what llama.cpp's converter reads
        # the family's added tokens (Phi-3's chat markers) after the SentencePiece pieces, at the GGUF's ids
        tokenizer.add_tokens([AddedToken(text, special=control, normalized=False) for text, control in added])
        # the family's end and padding tokens may be added ones (Phi-3 ends with <|endoftext|>)
        for name in ("eos", "padding"):
            if f"tokenizer.ggml.{name}_token_id" in reader.fields:
                token_id = int(_gguf_values(reader, f"tokenizer.ggml.{name}_token_id")[0][0])
                setattr(tokenizer, "eos_token" if name == "eos" else "pad_token", bytes(tokens[token_id]).decode())
        rows = len(tokens)
    else:
        tokenizer = _gguf_tokenizer(vocab_gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.for_model(
        architecture.model_type,
        vocab_size=max(len(tokenizer), rows),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.2,  # as build_tiny_models: logits wide enough for LoRA to move
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **dict(architecture.config),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@functools.cache
def _gguf_tokenizer(vocab_gguf: Path):
    """transformers' conversion of a GGUF's byte-level BPE vocabulary (half a minute for 150k tokens: once a process,
    as Qwen2 and Qwen3 share one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vocab_gguf.parent), gguf_file=vocab_gguf.name)


def _gguf_values(reader, key: str) -> list:
    found = reader.fields[key]
    return [found.parts[i] for i in found.data]


def _sentencepiece_model(reader, out_file: Path, dummy_prefix: bool) -> tuple[list[tuple[str, bool]], dict]:
    """A SentencePiece BPE model (byte fallback, whitespace as U+2581) from a GGUF's vocabulary; the control and
    user-defined tokens after its last normal piece are the family's added tokens, returned as (text, control) for
    the tokenizer to add, and [PAD] rows are embedding padding, neither in the model file. Also returns the model
    file's start, end and unknown pieces (tokenizer keyword arguments)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    def values(key: str) -> list:
        return _gguf_values(reader, key)

    tokens = [bytes(token).decode("utf-8") for token in values("tokenizer.ggml.tokens")]
    kinds = [int(kind[0]) for kind in values("tokenizer.ggml.token_type")]
    scores = [float(score[0]) for score in values("tokenizer.ggml.scores")]
    pieces = len(tokens)
    while kinds[pieces - 1] not in (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.BYTE):
        pieces -= 1
    # the model file's own start and end pieces: the GGUF's where they are pieces, else SentencePiece's names
    bos_id, eos_id = (int(values(f"tokenizer.ggml.{name}_token_id")[0][0]) for name in ("bos", "eos"))
    bos_id = bos_id if bos_id < pieces else tokens.index("<s>")
    eos_id = eos_id if eos_id < pieces else tokens.index("</s>")
    special = {bos_id, eos_id}
    unk_id = int(values("tokenizer.ggml.unknown_token_id")[0][0])
    proto = pb.ModelProto()
    for token_id in range(pieces):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = tokens[token_id], scores[token_id], kinds[token_id]
        if token_id == unk_id:
            piece.type = pb.ModelProto.SentencePiece.UNKNOWN
        elif token_id in special:
            piece.type = pb.ModelProto.SentencePiece.CONTROL
        elif piece.type == pb.ModelProto.SentencePiece.UNKNOWN:  # SentencePiece allows one
            piece.type = pb.ModelProto.SentencePiece.UNUSED
    spec = proto.trainer_spec
    spec.model_type, spec.byte_fallback, spec.vocab_size = pb.TrainerSpec.BPE, True, pieces
    spec.unk_id = unk_id
    spec.bos_id, spec.eos_id = bos_id, eos_id
    spec.pad_id = -1
    normalizer = proto.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", dummy_prefix
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    out_file.write_bytes(proto.SerializeToString())
    added = [
        (tokens[token_id], kinds[token_id] == pb.ModelProto.SentencePiece.CONTROL)
        for token_id in range(pieces, len(tokens))
        if not tokens[token_id].startswith("[PAD")
    ]
    return added, {"bos_token": tokens[bos_id], "eos_token": tokens[eos_id], "unk_token": tokens[unk_id]}
