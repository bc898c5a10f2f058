"""Loading a base model quantized by bitsandbytes (QLoRA's frozen base).

nf4: 4-bit NormalFloat with double quantization (the QLoRA paper's choice), computing in
the base's dtype (bf16 on CUDA, fp32 on CPU); int8: LLM.int8(). Only the linear layers
of the decoder are quantized (transformers keeps the output layer in full precision); LoRA
weights added on top stay in full precision. bitsandbytes 0.50 runs both on CPU too.
"""

from __future__ import annotations

from typing import Any

from app.errors import QuantizationUnavailable, public_message
from app.quantization import require_backend

# bitsandbytes' CPU 4-bit kernel (eval mode, AVX512-BF16) repacks each weight in blocks of
# 32 output rows and asserts the layer's output size is a multiple (its default block_n).
CPU_4BIT_ROWS = 32


def load_quantized(ref: str, config: Any, *, quantization: str, device: str, dtype: Any) -> Any:
    """The model at `ref` with its linear layers quantized; `QuantizationUnavailable` (no
    server paths in it) when this base cannot be quantized here."""
    from transformers import AutoModelForCausalLM

    require_backend(quantization)
    existing = getattr(config, "quantization_config", None)
    if existing:
        method = (
            existing.get("quant_method") if isinstance(existing, dict) else type(existing).__name__
        )
        raise QuantizationUnavailable(
            f"the base model is already quantized ({method}); it cannot be quantized again "
            f"to {quantization}: use quantization='none'",
            param="hyperparameters.quantization",
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref,
            dtype=dtype,
            quantization_config=bnb_config(quantization, dtype),
            device_map={"": device},
            use_safetensors=True,
            trust_remote_code=False,
        )
    except (ValueError, RuntimeError, TypeError, ImportError, AssertionError) as exc:
        raise QuantizationUnavailable(
            f"bitsandbytes could not quantize the base model to {quantization}: "
            f"{public_message(exc)}",
            param="hyperparameters.quantization",
        ) from exc
    _check_layers(model, quantization, device)
    if device == "cpu":
        _own_unquantized_weights(model)
    set_inference_kernel(model, False)  # trainable until a server opts in
    return model


def _own_unquantized_weights(model: Any) -> None:
    """Copy the tensors left in full precision (embeddings, norms, output layer) out of the
    safetensors file mapping, so the mapping is released.

    On CPU transformers hands those tensors out as views of the mapped file; while one view
    lives the whole mapping stays, and every page the load read to quantize the linear
    layers stays counted in the process's memory. At Llama 3.2 1B's shape that was 4.5 GB
    of file pages beside 1.5 GB of weights: an nf4 job peaked above the fp32 one.
    """
    import torch

    quantized = {id(p) for layer in quantized_layers(model).values() for p in layer.parameters()}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in quantized:
                tensor.data = tensor.data.clone()


def set_inference_kernel(model: Any, enabled: bool) -> None:
    """Let bitsandbytes' CPU 4-bit inference kernel take over (the engine), or not (training).

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for that kernel at the
    first forward pass in eval mode without grad (a validation pass, a packing probe), and
    the kernel has no backward: every later training step would skip the base path's
    gradient (measured: a first-layer LoRA gradient off by 0.03 after one eval pass).
    So a base loads without it; only the inference engine turns it on.
    """
    from bitsandbytes.functional import has_avx512bf16

    for layer in quantized_layers(model).values():
        if hasattr(layer, "support_avx512bf16_for_cpu"):  # Linear4bit (bitsandbytes 0.50)
            layer.support_avx512bf16_for_cpu = enabled and has_avx512bf16()  # type: ignore[no-untyped-call]


def repacked_for_inference(model: Any) -> list[str]:
    """The 4-bit layers whose weight the CPU inference kernel already repacked."""
    return [
        name
        for name, layer in quantized_layers(model).items()
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]


def is_quantized(model: Any) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def bnb_config(quantization: str, compute_dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    raise ValueError(f"unknown quantization {quantization!r}")


def quantized_layers(model: Any) -> dict[str, Any]:
    """{name: module} of the bitsandbytes linear layers of `model`."""
    from bitsandbytes.nn.modules import Linear4bit, Linear8bitLt

    kinds = (Linear4bit, Linear8bitLt)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _check_layers(model: Any, quantization: str, device: str) -> None:
    """Refuse a base bitsandbytes left unquantized, or whose layers its CPU kernel cannot
    run: a job fails at load, not at its first validation pass."""
    layers = quantized_layers(model)
    if not layers:
        raise QuantizationUnavailable(
            f"the base model has no linear layer bitsandbytes can quantize to {quantization}",
            param="hyperparameters.quantization",
        )
    if quantization != "nf4" or device != "cpu":
        return
    odd = [(n, m.out_features) for n, m in layers.items() if m.out_features % CPU_4BIT_ROWS]
    if odd:
        name, size = odd[0]
        raise QuantizationUnavailable(
            f"the base model cannot run 4-bit on CPU: its layer {name} has {size} outputs "
            f"and bitsandbytes' CPU kernel needs a multiple of {CPU_4BIT_ROWS} "
            f"({len(odd)} such layers); use quantization='none' or a GPU",
            param="hyperparameters.quantization",
        )
