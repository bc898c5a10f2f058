"""QLoRA's training side: a quantized base made ready for LoRA layers (`setup._wrap`)."""

from __future__ import annotations

from typing import Any

from peft import prepare_model_for_kbit_training

from app.ml.quantized import is_quantized, quantized_layers


def prepare_for_training(model: Any, *, gradient_checkpointing: bool) -> Any:
    """A quantized base made ready for LoRA training (a full-precision one as it is).

    PEFT's k-bit preparation casts the unquantized rest (norms, embeddings, output layer) to
    fp32 for stable training; checkpointing only when the job asks (PEFT's default is on).
    And the 4-bit layers keep their trainable layout: on a CPU with AVX512-BF16, bitsandbytes
    repacks a layer's weight for its inference kernel at the first forward pass in eval
    mode without grad (a validation pass), and that kernel has no backward: every later
    step's gradients would skip the base path (measured: a first-layer LoRA gradient off by
    0.03 after one eval pass, the loss changed).
    """
    if not is_quantized(model):
        return model

    model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    for layer in quantized_layers(model).values():
        if hasattr(layer, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit (0.50)
            layer.support_avx512bf16_for_cpu = False
    return model
