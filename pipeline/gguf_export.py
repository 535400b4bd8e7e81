"""GGUF export with llama.cpp's own tools: its converter, its quantizer, and what a runtime needs beside the file.

- `export_f16` runs llama.cpp's `convert_hf_to_gguf.py` on the merged model (from a view of it whose
  tokenizer carries the chat template the specialist was trained with);
- `quantize` turns that file into q4_k_m, q4_0, ... with `llama_cpp.llama_model_quantize` (llama.cpp's
  quantizer, no binary needed); q8_0, bf16 and f32 come straight from the converter;
- `tensor_types` reads back which types the file really holds (llama.cpp falls back to other types for
  tensors whose rows do not divide into its blocks, so a "q4_k_m" file may be mostly q5_0);
- `convert_lora` runs llama.cpp's `convert_lora_to_gguf.py` on the adapter: a LoRA GGUF that llama.cpp applies
  to a base GGUF at load or per request (one base in memory, many specialists);
- `modelfile` writes the Ollama Modelfile: FROM (and ADAPTER), the template, the stop token, greedy parameters.

The converter and quantizer run in a child process (`python -m pipeline.gguf_export ...`): the converter must
import the `gguf` package vendored beside it, not the PyPI one transformers uses, and both print
thousands of lines that belong in a log file, not the terminal.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from pipeline.errors import PipelineError

# llama.cpp file types: written by the converter directly, or by the quantizer from the f16 file.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = {  # name: llama_ftype (llama.h); the IQ types that need an importance matrix are left out
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q5_0": 8,
    "q5_1": 9,
    "q4_k_m": 15,
    "q4_k_s": 14,
    "q4_0": 2,
    "q4_1": 3,
    "iq4_nl": 25,
    "iq4_xs": 30,
    "q3_k_l": 13,
    "q3_k_m": 12,
    "q3_k_s": 11,
    "q2_k": 10,
}
TYPES = (*CONVERTER_TYPES, *QUANTIZER_TYPES)  # the recipe's quantize[].type accepts exactly these
LORA_TYPES = CONVERTER_TYPES  # what convert_lora_to_gguf.py writes an adapter as


def variant_files(kind: str, folder: Path) -> tuple[Path, Path | None]:
    """What a quantize variant's folder runs as in llama.cpp: (its model.gguf, None) for kind gguf; for kind
    gguf-lora (the shared base GGUF its base.json names, its adapter.gguf)."""
    if kind == "gguf":
        return folder / "model.gguf", None
    about = folder / "base.json"
    if not about.is_file():
        raise PipelineError(f"{folder}: no base.json naming the shared base GGUF; rerun the quantize stage")
    base = Path(json.loads(about.read_text())["file"])
    if not base.is_file():
        raise PipelineError(
            f"{folder}: its shared base GGUF {base} is gone (a cleared cache?); rerun the quantize stage to rebuild it"
        )
    return base, folder / "adapter.gguf"


def convert(converter: Path, model_dir: Path, out_file: Path, out_type: str, log_path: Path) -> None:
    """llama.cpp's converter: a Hugging Face model folder -> one GGUF file of type f32/f16/bf16/q8_0."""
    _child(["convert", str(converter), str(model_dir), str(out_file), out_type], log_path, f"converting {model_dir}")


def convert_lora(
    lora_converter: Path, adapter_dir: Path, base_dir: Path, out_file: Path, out_type: str, log_path: Path
) -> None:
    """llama.cpp's convert_lora_to_gguf.py: a peft adapter folder -> a LoRA GGUF (A and B matrices, alpha) for the
    base model whose config is in base_dir."""
    args = ["convert-lora", str(lora_converter), str(adapter_dir), str(base_dir), str(out_file), out_type]
    _child(args, log_path, f"converting the adapter {adapter_dir}")


def quantize(f16_file: Path, out_file: Path, out_type: str, log_path: Path, threads: int) -> None:
    """llama.cpp's quantizer, through llama-cpp-python: the f16 GGUF -> a k-quant or legacy quant."""
    _child(["quantize", str(f16_file), str(out_file), out_type, str(threads)], log_path, f"quantizing to {out_type}")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds, e.g. {"Q5_0": 166, "Q4_K": 40, "F32": 61}."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return dict(Counter(t.tensor_type.name for t in reader.tensors).most_common())


def metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """Scalar and string metadata fields of a GGUF file (token ids, chat template, ...)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    found = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            found[key] = field.contents()
    return found


# --- what the specialist was trained with, as templates for llama.cpp and Ollama -------------------


def plain_prompt_parts(prompt_template: str | None) -> tuple[str, str] | None:
    """(text before, text after) the one {field} of a plain prompt template, or None when there is not one.

    A plain-prompt specialist was trained on "Before {text} after"; a runtime that gets only the user's
    text must wrap it the same way.
    """
    if prompt_template is None:
        return None
    fields = re.findall(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})", prompt_template)
    if len(set(fields)) != 1 or len(fields) != 1:
        return None
    before, _, after = prompt_template.partition("{" + fields[0] + "}")
    return before.replace("{{", "{").replace("}}", "}"), after.replace("{{", "{").replace("}}", "}")


def plain_chat_template(parts: tuple[str, str] | None) -> str:
    """A Jinja chat template that renders the last user message into the plain prompt it was trained on."""
    user = "{{ messages[-1]['content'] }}"
    if parts is None:
        return user  # the client sends the whole rendered prompt
    before, after = parts
    return "{{ " + json.dumps(before) + " }}" + user + "{{ " + json.dumps(after) + " }}"


def ollama_template(tokenizer, chat: bool, parts: tuple[str, str] | None) -> str:
    """The Go template Ollama renders a single request with, equal to what the specialist saw in training.

    For a chat specialist it is the tokenizer's own chat template rendered once with marker strings in
    place of the system message and the prompt, so it reproduces that template exactly for one turn.
    """
    if not chat:
        if parts is None:
            return "{{ .Prompt }}"
        return _go_literal(parts[0]) + "{{ .Prompt }}" + _go_literal(parts[1])
    system_marker, prompt_marker = "\x00SYSTEM\x00", "\x00PROMPT\x00"
    user = {"role": "user", "content": prompt_marker}

    def render(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pieces = re.split("(\x00SYSTEM\x00|\x00PROMPT\x00)", text)
        markers = {system_marker: "{{ .System }}", prompt_marker: "{{ .Prompt }}"}
        return "".join(markers.get(p, _go_literal(p)) for p in pieces)

    without_system = render([user])
    try:
        with_system = render([{"role": "system", "content": system_marker}, user])
    except Exception:  # noqa: BLE001 - some templates refuse a system turn; then there is no system slot
        return without_system
    return "{{ if .System }}" + with_system + "{{ else }}" + without_system + "{{ end }}"


# Checked in Ollama's source as of 2026-08-21 (v0.33.0-rc2: parser/parser.go reads ADAPTER, server/create.go keeps a
# GGUF whose general.type is "adapter" as an adapter layer); a later release that drops it is reported, not seen.
ADAPTER_NOTE = (
    "# ADAPTER: taken by `ollama create` up to v0.33 at least; where yours refuses it, serve the adapter with "
    "`specialist serve --adapters` or `llama-server -m <base> --lora <adapter>`, or deploy a merged gguf variant"
)


def modelfile(
    gguf_name: str,
    template: str,
    stop: list[str],
    max_new_tokens: int,
    system: str | None,
    adapter_name: str | None = None,
) -> str:
    """An Ollama Modelfile: `ollama create NAME -f Modelfile` in this folder, no edits needed. With an adapter,
    FROM is the shared base file (a path) and ADAPTER the LoRA GGUF beside the Modelfile: Ollama stores the
    base once however many specialists name it."""
    lines = [
        "# Written by specialist: the template and stop token this model was trained with; greedy decoding as",
        '# in its evaluation. ollama create NAME -f Modelfile && ollama run NAME "your input"',
        f"FROM {gguf_name}" if adapter_name else f"FROM ./{gguf_name}",
        *([ADAPTER_NOTE, f"ADAPTER ./{adapter_name}"] if adapter_name else []),
        f'TEMPLATE """{template}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop]
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", f"PARAMETER num_predict {max_new_tokens}"]
    return "\n".join(lines) + "\n"


def _go_literal(text: str) -> str:
    """Text as it must appear in a Go template: only the delimiters need escaping."""
    return text.replace("{{", '{{ "{{" }}')


# --- the child process ------------------------------------------------------------------------


def _child(args: list[str], log_path: Path, what: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.gguf_export", *args], stdout=log_file, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        lines = log_path.read_text(errors="replace").splitlines()
        reason = next((line for line in reversed(lines) if line.startswith("specialist-error: ")), None)
        if reason:
            raise PipelineError(f"{what}: {reason.removeprefix('specialist-error: ')} (log: {log_path})")
        tail = "\n".join(lines[-12:])
        raise PipelineError(f"{what} failed with llama.cpp's tools (log: {log_path}); last lines:\n{tail}")


def _run_converter(converter: str, model_dir: str, out_file: str, out_type: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py main() as its own command line would.

    One addition: a tokenizer whose pre-tokenizer is exactly GPT-2's (byte-level with GPT-2's split
    regex) but whose vocabulary the converter's hash table does not list gets llama.cpp's "gpt-2"
    pre-tokenizer instead of an error. Any other unknown pre-tokenizer stays an error; the token parity
    check at evaluation would catch a wrong guess either way.
    """
    sys.path.insert(0, str(Path(converter).parent))
    sys.argv = [converter, model_dir, "--outfile", out_file, "--outtype", out_type]
    import convert_hf_to_gguf  # noqa: F401 - puts the vendored gguf-py first on sys.path
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if _is_gpt2_pre_tokenizer(Path(model_dir) / "tokenizer.json"):
                return "gpt-2"
            print(
                "specialist-error: llama.cpp's converter does not know this tokenizer's pre-tokenizer; a newer "
                "llama.cpp may (see the log for its chkhsh)",
                flush=True,
            )
            raise

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    convert_hf_to_gguf.main()


def _is_gpt2_pre_tokenizer(tokenizer_json: Path) -> bool:
    if not tokenizer_json.is_file():
        return False
    pre = json.loads(tokenizer_json.read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def _run_lora_converter(script: str, adapter_dir: str, base_dir: str, out_file: str, out_type: str) -> None:
    """convert_lora_to_gguf.py as its command line runs it (its work is under `if __name__ == "__main__"`)."""
    import runpy

    sys.path.insert(0, str(Path(script).parent))
    sys.argv = [script, "--base", base_dir, "--outfile", out_file, "--outtype", out_type, adapter_dir]
    runpy.run_path(script, run_name="__main__")


def _run_quantizer(f16_file: str, out_file: str, out_type: str, threads: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZER_TYPES[out_type]
    params.nthread = int(threads)
    status = llama_cpp.llama_model_quantize(f16_file.encode(), out_file.encode(), params)
    if status != 0:
        print(f"specialist-error: llama_model_quantize returned {status}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    verb, *rest = sys.argv[1:]
    if verb == "convert":
        _run_converter(*rest)
    elif verb == "convert-lora":
        _run_lora_converter(*rest)
    elif verb == "quantize":
        _run_quantizer(*rest)
    else:
        sys.exit(f"unknown verb {verb}")
