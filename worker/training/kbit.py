"""QLoRA's training side: a quantized base made ready for LoRA layers (`setup._wrap`)."""

from __future__ import annotations

from typing import Any

from peft import prepare_model_for_kbit_training

from app.ml.quantized import is_quantized, repacked_for_inference


def prepare_for_training(model: Any, *, gradient_checkpointing: bool) -> Any:
    """A quantized base made ready for LoRA training (a full-precision one as it is).

    PEFT's k-bit preparation casts the unquantized rest (norms, embeddings, output layer) to
    fp32 for stable training; checkpointing only when the job asks (PEFT's default is on).
    The base must not have run bitsandbytes' CPU inference kernel, which has no backward
    (`app/ml/quantized.set_inference_kernel`; `load_base_model` leaves it off).
    """
    if not is_quantized(model):
        return model
    repacked = repacked_for_inference(model)
    if repacked:
        raise RuntimeError(
            f"4-bit layers {repacked[:3]} were repacked for inference; training them would "
            "drop their gradients: load the base with the inference kernel off"
        )
    return prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
