"""train.compile: the decoder layers compiled with torch.compile (inductor) for training steps.

On a CPU, a LoRA step spends a fifth of its time outside the matmuls, in element-wise work (RMSNorm, SiLU, the
rotary embedding, residual adds, the adapter's scaling) that runs as one pass over memory per operation. Inductor
fuses those passes into a few generated C++ loops. Each decoder layer is compiled for training only ("regional
compilation": the layers share one compiled graph, so compiling costs one layer's time, not the model's); the
validation passes, which generate with a KV cache in eval mode, run the layers as they are. Compiling takes
about a minute the first time on 2 cores and seconds after that (inductor caches its code on disk), so it pays
on long runs only; measured in the README ("Training speed").
"""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The repeated blocks of a transformers decoder (model.model.layers for Llama, Qwen, Mistral, Phi-3,
    Gemma); an architecture that keeps them elsewhere is an error naming train.compile."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise PipelineError(
            f"train.compile: {type(base).__name__} keeps no decoder layers at model.layers; set train.compile: false"
        )
    return layers


def compile_for_training(model) -> int:
    """Route each decoder layer's training forward (grad enabled, train mode) through one torch.compile'd
    function; anything else (eval, inference) runs the layer's own forward. Returns the number of layers."""
    layers = decoder_layers(model)
    compiled = torch.compile(type(layers[0]).forward, dynamic=True)  # one function: every layer reuses its graph
    for layer in layers:
        original = layer.forward

        def forward(*args, _layer=layer, _original=original, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return compiled(_layer, *args, **kwargs)
            return _original(*args, **kwargs)

        layer.forward = forward
    return len(layers)
