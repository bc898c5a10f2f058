"""Bounds on the work one fine-tuning job may ask for, checked when it is created.

Without them one request could hold a GPU for an unbounded time: one optimizer step of
batch 256 * accumulation 1024 * 65536 tokens is a whole epoch that no cancel interrupts
between steps, and n_epochs * examples sets how many steps there are (plus the
validation set, evaluated whole at each checkpoint). Each is refused
with a 400 naming the field and the limit; 0 disables a limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.errors import InvalidRequest
from app.jobs.spec import SupervisedHyperparameters
from app.model_config import context_length


@dataclass(frozen=True)
class WorkLimits:
    max_tokens_per_step: int = 0  # batch_size * gradient_accumulation_steps * max_seq_length
    # n_epochs * training examples + n_checkpoints * validation examples
    max_examples_per_job: int = 0

    @classmethod
    def of(cls, settings: Settings) -> WorkLimits:
        return cls(settings.max_tokens_per_step, settings.max_examples_per_job)


def check_job_work(
    resolved: SupervisedHyperparameters,
    *,
    n_examples: int,
    n_validation_examples: int = 0,
    base_model: str,
    model_ref: str,
    limits: WorkLimits,
) -> None:
    """Refuse (InvalidRequest naming the field) a job whose work exceeds a bound."""
    max_seq_length = resolved.max_seq_length
    check_context(max_seq_length, context_length(model_ref), base_model)
    # "auto" splits batch_size into micro-batches: the step stays batch_size examples
    accumulation = resolved.gradient_accumulation_steps
    steps = 1 if accumulation == "auto" else accumulation
    # a DPO item is a pair: two sequences
    per_step = resolved.batch_size * resolved.EXAMPLES_PER_ITEM * steps * max_seq_length
    if limits.max_tokens_per_step and per_step > limits.max_tokens_per_step:
        raise InvalidRequest(
            f"batch_size * gradient_accumulation_steps * max_seq_length is {per_step} tokens "
            f"per optimizer step; this server allows at most {limits.max_tokens_per_step}",
            param="hyperparameters",  # a product of three fields; the message names them
            code="too_many_tokens_per_step",
        )
    check_examples(resolved, n_examples, n_validation_examples, limits)


def check_context(max_seq_length: int, context: int | None, base_model: str) -> None:
    """max_seq_length within the base model's context (None: the config declares none). At
    creation for a local model; in the worker once a hub model's config is loaded."""
    if context is not None and max_seq_length > context:
        raise InvalidRequest(
            f"max_seq_length {max_seq_length} is longer than the context of base model "
            f"{base_model!r} ({context} positions)",
            param="hyperparameters.max_seq_length",
            code="max_seq_length_too_long",
        )


def check_examples(
    resolved: SupervisedHyperparameters,
    n_examples: int,
    n_validation_examples: int,
    limits: WorkLimits,
) -> None:
    """The examples bound, at creation on the files' lines and again in the worker on the
    examples they encode to (a chat template that rewrites history trains one per turn)."""
    # Each evaluation (every checkpoint, n_evals more) computes the loss over the whole
    # validation set: forward passes that hold the GPU like training ones, so they count
    # against the same bound.
    evaluations = resolved.n_checkpoints + resolved.n_evals
    examples = resolved.n_epochs * n_examples + evaluations * n_validation_examples
    if limits.max_examples_per_job and examples > limits.max_examples_per_job:
        terms, values = "n_epochs * training examples", f"{resolved.n_epochs} * {n_examples}"
        if n_validation_examples:
            terms += " + (n_checkpoints + n_evals) * validation examples"
            values += f" + {evaluations} * {n_validation_examples}"
        raise InvalidRequest(
            f"{terms} is {values} = {examples} examples to run; this server allows at "
            f"most {limits.max_examples_per_job} per job",
            param="hyperparameters.n_epochs",
            code="too_many_examples",
        )
