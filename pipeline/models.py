"""Where weights come from, and how they are loaded: the only module that knows either.

A model reference is a local directory (safetensors weights and a tokenizer) or a Hub id
(`org/name`, optionally `org/name@revision`). `build_tiny_models` makes the random-init Llamas the
tiny recipe and the tests use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.errors import PipelineError

Quantization = Literal["bnb-nf4", "bnb-int8"]


@dataclass(frozen=True)
class ModelSource:
    """A resolved reference: what from_pretrained gets, and how to name it in reports."""

    location: str  # local folder or Hub id
    revision: str | None
    is_local: bool

    @property
    def fingerprint(self) -> str:
        """Identity of the weights, for generation caches and done markers."""
        if not self.is_local:
            return f"hub:{self.location}@{self.revision or 'main'}"
        weights = sorted(Path(self.location).glob("*.safetensors"))
        stats = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]
        return f"local:{self.location}:{json.dumps(stats)}"


def resolve_model(ref: str, field: str = "model.base") -> ModelSource:
    """Turn a recipe's model reference into something from_pretrained can load."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise PipelineError(
                f"{field}: {ref} has no .safetensors weights (only safetensors are loaded, for safety); "
                "convert the checkpoint with save_pretrained(safe_serialization=True)"
            )
        return ModelSource(str(path.resolve()), None, is_local=True)
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") != 1:
        hint = " (build the tiny test models with `make tiny-models`)" if "tiny-models" in ref else ""
        raise PipelineError(f"{field}: no model folder at {ref}{hint}; give a local folder or a Hub id org/name")
    repo, _, revision = ref.partition("@")
    return ModelSource(repo, revision or None, is_local=False)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(setting: str) -> torch.dtype:
    """auto: fp32 on CPU (bf16 matmul is far slower there), bf16 on CUDA that has it, else fp16."""
    if setting != "auto":
        return getattr(torch, setting)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    quantization: Quantization | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM on this machine's device, optionally quantized on load by bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if quantization == "bnb-nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    elif quantization == "bnb-int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quantization:
        kwargs["device_map"] = {"": str(device())}
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if not quantization:
        model.to(device())
    return model


def _from_pretrained(cls, source: ModelSource, **kwargs):
    try:
        return cls.from_pretrained(source.location, revision=source.revision, **kwargs)
    except OSError as e:
        if source.is_local:
            raise PipelineError(f"could not load {source.location}: {e}") from None
        raise PipelineError(
            f"could not load {source.location} from the Hugging Face Hub ({str(e).splitlines()[0]}). "
            "If this machine is offline, download the model where you have the Hub "
            "(`hf download ORG/NAME --local-dir DIR`) and give DIR in the recipe."
        ) from None


# --- tiny random-init models for the tiny recipe and the tests ----------------------------------

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
