"""Hyperparameters: schema bounds, "auto" resolution, continuing an adapter, target modules,
and the run spec that stores them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.errors import InvalidRequest
from app.jobs.hyperparameters import (
    check_target_modules,
    continue_from,
    linear_module_names,
    resolve,
    unmatched_modules,
)
from app.jobs.spec import RunSpec, SupervisedMethod
from app.schemas.jobs import Hyperparameters, JobCreate


def test_resolve_fills_every_knob_and_keeps_the_seed() -> None:
    resolved = resolve(
        Hyperparameters(lora_r=4, use_dora=True), n_examples=200, seed=9, dataset_format="chat"
    )
    assert resolved.n_epochs == 3 and resolved.batch_size == 8
    assert resolved.lora_alpha == 8 and resolved.learning_rate == pytest.approx(2e-4)
    assert resolved.use_dora is True and resolved.seed == 9
    assert resolved.packing is True and resolved.train_on_inputs is False
    # the memory knobs are the worker's to plan (worker/job_memory.py): they stay "auto"
    memory = {"gradient_accumulation_steps", "gradient_checkpointing"}
    assert {k for k, v in resolved.model_dump().items() if v == "auto"} == memory


def test_fixed_memory_knobs_are_kept_and_unplanned_auto_trains_as_before_planning() -> None:
    fixed = resolve(
        Hyperparameters(gradient_accumulation_steps=2, gradient_checkpointing=True),
        n_examples=10,
        seed=1,
    )
    assert (fixed.accumulation, fixed.checkpointing) == (2, True)
    unplanned = resolve(Hyperparameters(), n_examples=10, seed=1)
    assert (unplanned.accumulation, unplanned.checkpointing) == (1, False)


@pytest.mark.parametrize(
    ("fmt", "expected"), [("text", True), ("chat", False), ("completion", False)]
)
def test_train_on_inputs_auto_follows_the_dataset_format(fmt, expected) -> None:
    resolved = resolve(Hyperparameters(), n_examples=10, seed=1, dataset_format=fmt)
    assert resolved.train_on_inputs is expected
    explicit = resolve(Hyperparameters(train_on_inputs=True), n_examples=10, seed=1)
    assert explicit.train_on_inputs is True


def test_continue_from_keeps_the_parent_lora_shape() -> None:
    resolved = resolve(Hyperparameters(lora_r=4), n_examples=10, seed=1)
    parent = {"lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["q_proj"], "n_epochs": 9}
    merged = continue_from(resolved, parent)
    assert merged.lora_r == 16 and merged.lora_target_modules == ["q_proj"]
    assert merged.n_epochs == resolved.n_epochs  # training knobs stay the new job's
    # PEFT continues the parent's token rows (or none): what the new job asks is not what runs
    asks = resolve(Hyperparameters(train_special_tokens=True), n_examples=10, seed=1)
    assert continue_from(asks, parent).train_special_tokens is False
    parent["train_special_tokens"] = ["<|user|>"]
    assert continue_from(resolved, parent).train_special_tokens == ["<|user|>"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"use_dora": "sometimes"}, "use_dora"),
        ({"packing": "maybe"}, "packing"),
        ({"train_on_inputs": "maybe"}, "train_on_inputs"),
        ({"seed": -1}, "seed"),
        ({"lora_target_modules": ["q_proj; rm -rf"]}, "lora_target_modules"),
        ({"gradient_checkpoint": True}, "gradient_checkpoint"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_field(body, field) -> None:
    with pytest.raises(ValidationError) as caught:
        Hyperparameters.model_validate(body)
    assert field in str(caught.value)


def test_two_different_seeds_are_refused() -> None:
    with pytest.raises(ValidationError, match="seed"):
        JobCreate(model="m", training_file="f", seed=1, hyperparameters={"seed": 2})
    assert (
        JobCreate(model="m", training_file="f", hyperparameters={"seed": 2}).requested_seed() == 2
    )


def test_target_modules_are_checked_against_the_model_files(tiny_model_dir) -> None:
    names = linear_module_names(tiny_model_dir)
    assert "model.layers.0.self_attn.q_proj" in names
    check_target_modules(str(tiny_model_dir), ["q_proj", "v_proj"])
    check_target_modules(str(tiny_model_dir), "all-linear")
    with pytest.raises(InvalidRequest) as caught:
        check_target_modules(str(tiny_model_dir), ["q_proj", "qkv_proj"])
    assert caught.value.param == "hyperparameters.lora_target_modules"
    assert "qkv_proj" in caught.value.message and "q_proj" in caught.value.message


def test_a_hub_id_is_left_for_the_worker_to_check(tmp_path) -> None:
    assert linear_module_names(tmp_path / "not-here") is None
    check_target_modules("org/some-hub-model", ["anything"])  # checked when the job starts


def test_train_special_tokens_are_checked_against_the_local_vocabulary(tiny_model_dir) -> None:
    from app.jobs.hyperparameters import check_special_tokens

    check_special_tokens(str(tiny_model_dir), ["<|user|>", "<|end|>"])
    check_special_tokens(str(tiny_model_dir), True)
    check_special_tokens("org/hub-model", ["<|anything|>"])  # the worker checks a hub model
    with pytest.raises(InvalidRequest) as caught:
        check_special_tokens(str(tiny_model_dir), ["<|user|>", "<|im_start|>", "<|tool|>"])
    assert caught.value.param == "hyperparameters.train_special_tokens"
    assert "['<|im_start|>', '<|tool|>']" in str(caught.value)


@pytest.mark.parametrize("value", ["sometimes", [], [""], ["x" * 101], None, [1]])
def test_train_special_tokens_takes_a_bool_or_a_list_of_token_strings(value) -> None:
    with pytest.raises(ValidationError):
        Hyperparameters(train_special_tokens=value)
    assert Hyperparameters().train_special_tokens is False


def test_the_run_spec_is_stored_in_the_job_columns_and_read_back() -> None:
    resolved = resolve(Hyperparameters(lora_target_modules=["q_proj"]), n_examples=40, seed=7)
    spec = RunSpec(
        base_model="tiny",
        parent_model=None,
        training_file="file-a",
        validation_file="file-b",
        method=SupervisedMethod(hyperparameters=resolved),
    )
    columns = spec.job_columns()
    assert columns["hyperparameters"] == resolved.model_dump() and columns["seed"] == 7
    assert list(columns["hyperparameters"]) == list(Hyperparameters.model_fields)  # shown so
    row = type("Job", (), {**columns, "model": "tiny"})
    assert RunSpec.of_job(row) == spec


def test_a_job_stored_before_the_later_knobs_still_loads() -> None:
    """Rows from before a knob existed lack its key: they load as they trained."""
    first_keys = (
        "n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "lora_r",
        "lora_alpha", "lora_dropout", "lora_target_modules", "max_seq_length", "warmup_ratio",
        "weight_decay", "lr_scheduler", "seed",
    )  # fmt: skip
    stored = resolve(Hyperparameters(n_epochs=4), n_examples=10, seed=3).model_dump()
    row = type("Job", (), {
        "model": "tiny", "parent_model": None, "training_file": "f", "validation_file": None,
        "integrations": None, "hyperparameters": {key: stored[key] for key in first_keys},
        "method": "supervised",  # migration 0009 gave every older row this
    })  # fmt: skip
    old = RunSpec.of_job(row).method.hyperparameters
    assert old.n_checkpoints == 4 and old.packing is True and old.gradient_accumulation_steps == 1
    assert old.gradient_checkpointing is False  # rows from before planning trained without
    assert old.train_special_tokens is False and old.train_on_inputs is False


@pytest.mark.parametrize(("method", "named"), [("reinforcement", "reinforcement"), ("dpo", "beta")])
def test_a_method_the_spec_does_not_know_is_refused(method: str, named: str) -> None:
    """An unknown method, and a DPO spec without its own hyperparameter."""
    resolved = resolve(Hyperparameters(), n_examples=10, seed=1).model_dump()
    with pytest.raises(ValidationError, match=named):
        RunSpec.model_validate(
            {
                "base_model": "tiny",
                "parent_model": None,
                "training_file": "f",
                "validation_file": None,
                "method": {"type": method, "hyperparameters": resolved},
            }
        )


def test_a_dpo_request_resolves_beta_and_counts_pairs() -> None:
    from app.jobs.spec import DpoHyperparameters as Resolved
    from app.schemas.jobs import DpoHyperparameters

    auto = resolve(DpoHyperparameters(), n_examples=40, seed=1)
    assert isinstance(auto, Resolved) and auto.beta == 0.1 and auto.batch_size == 4
    assert resolve(DpoHyperparameters(beta=0.3), n_examples=40, seed=1).beta == 0.3


def test_a_target_module_matches_a_full_name_or_its_last_components() -> None:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert unmatched_modules(["q_proj", "self_attn.q_proj", "mlp.up_proj"], names) == []
    assert unmatched_modules(["proj", "attn.q_proj", "k_proj"], names) == [
        "proj",
        "attn.q_proj",
        "k_proj",
    ]
