"""The run spec: everything a worker needs to run one fine-tuning job, typed and resolved.

The API builds it when a job is created (request validated, "auto" resolved:
`app/jobs/hyperparameters.py`) and stores it in the job row's columns (`job_columns`);
the worker reads it back (`RunSpec.of_job`) and trains from it. It is the one definition of
what a job runs: the request schema (`app/schemas/jobs.py`) says what may be asked, the
training loop takes these hyperparameters as they are, with no defaults of its own.

It grows by method: `method` is a union discriminated by `type`, as OpenAI's fine-tuning API
has `method.type`: supervised fine-tuning, and preference tuning (DPO,
`{"type": "dpo", "hyperparameters": {..., "beta": ...}}`), whose hyperparameters are the
supervised ones plus `beta`. A choice orthogonal to the method, such as a quantized base
(QLoRA), is a field of `RunSpec`. The job row keeps the hyperparameters in its
`hyperparameters` JSON column and the method's type in its `method` column (migration 0009).

Torch-free and free of the database: the training core (`worker/training`) imports it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from app.schemas.jobs import Auto, Integration, LrScheduler, Quantization


class SupervisedHyperparameters(BaseModel):
    """The resolved hyperparameters of a supervised job (never "auto"): what the API shows as
    `hyperparameters` and stores on the job row, in this order. The one exception: the
    memory knobs below stay "auto" until the worker, which knows the device, plans them
    (`accumulation` and `checkpointing` say what trains)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Examples one training item holds: a step of batch_size items trains this many times
    # as many sequences (a preference pair is two: chosen and rejected).
    EXAMPLES_PER_ITEM: ClassVar[int] = 1

    n_epochs: PositiveInt
    batch_size: PositiveInt  # examples per micro-batch (packing puts them in fewer rows)
    learning_rate_multiplier: float  # shown to the user; `learning_rate` is what trains
    learning_rate: float
    lora_r: PositiveInt
    lora_alpha: PositiveInt
    lora_dropout: float
    lora_target_modules: Literal["all-linear"] | list[str]
    max_seq_length: PositiveInt
    warmup_ratio: float
    weight_decay: float
    lr_scheduler: LrScheduler  # after a linear warmup
    # The defaults below are for rows stored before the knob existed; the API always
    # stores every key. train_on_inputs False is the per-format rule those rows trained with.
    # "auto": the worker's memory plan decides before loading the base (worker/job_memory.py)
    # and writes its choice back here: then batch_size is the micro-batch and the step
    # trains batch_size x gradient_accumulation_steps examples, the batch that was asked.
    gradient_accumulation_steps: PositiveInt | Auto = 1
    use_rslora: bool = False
    use_dora: bool = False
    gradient_checkpointing: bool | Auto = False
    train_on_inputs: bool = False
    # asked for; the worker trains packed only where the model isolates packed examples
    packing: bool = True
    train_special_tokens: bool | list[str] = False  # a list: token strings
    seed: int
    n_checkpoints: PositiveInt  # evenly spaced over the steps, the last at the end
    quantization: Quantization = "none"  # the base's precision while training (QLoRA)
    # Evaluations (full validation loss) besides each checkpoint's; early stopping on them
    # (docs/design.md 4.17). None: never stop early.
    n_evals: NonNegativeInt = 0
    early_stopping_patience: PositiveInt | None = None
    early_stopping_threshold: float = 0.0

    # What trains: the plan's decision. "auto" still here means no plan was made (the worker
    # always plans; a direct caller of the training core may not): no split, no
    # checkpointing, as every job trained before planning existed.
    @property
    def accumulation(self) -> int:
        """gradient_accumulation_steps as it trains ("auto" unplanned: 1)."""
        steps = self.gradient_accumulation_steps
        return 1 if steps == "auto" else steps

    @property
    def checkpointing(self) -> bool:
        """gradient_checkpointing as it trains ("auto" unplanned: off)."""
        return self.gradient_checkpointing is True

    @model_validator(mode="before")
    @classmethod
    def _one_checkpoint_per_epoch_on_older_rows(cls, data: Any) -> Any:
        if isinstance(data, dict) and "n_checkpoints" not in data and "n_epochs" in data:
            return data | {"n_checkpoints": data["n_epochs"]}
        return data


class SupervisedMethod(BaseModel):
    """Supervised fine-tuning: next-token loss on the dataset's trainable tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["supervised"] = "supervised"
    hyperparameters: SupervisedHyperparameters


class DpoHyperparameters(SupervisedHyperparameters):
    """A DPO job's resolved hyperparameters: the supervised ones (a training item is a
    preference pair, so `batch_size` counts pairs) plus `beta`, the strength of the pull
    towards the reference policy."""

    EXAMPLES_PER_ITEM: ClassVar[int] = 2

    beta: Annotated[float, Field(gt=0)]


class DpoMethod(BaseModel):
    """Direct preference optimisation (Rafailov et al. 2023) against a frozen reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dpo"] = "dpo"
    hyperparameters: DpoHyperparameters


Method = Annotated[SupervisedMethod | DpoMethod, Field(discriminator="type")]
MethodType = Literal["supervised", "dpo"]


class RunSpec(BaseModel):
    """One job's run: what to train, on what, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str  # the allowlist name; the worker maps it to its weights
    parent_model: str | None  # the ft: adapter this job continues, if any
    training_file: str
    validation_file: str | None
    method: Method
    # Where the worker also logs the run's config and metrics (W&B, MLflow), as requested.
    integrations: tuple[Integration, ...] = ()

    def job_columns(self) -> dict[str, Any]:
        """The job row's columns that store this spec."""
        hyperparameters = self.method.hyperparameters
        return {
            "model": self.base_model,
            "parent_model": self.parent_model,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "method": self.method.type,
            "hyperparameters": hyperparameters.model_dump(),
            "seed": hyperparameters.seed,  # a copy for the API's top-level `seed`
            # as given (the job object shows them so): unset keys stay unset
            "integrations": [
                i.model_dump(mode="json", exclude_unset=True) for i in self.integrations
            ]
            or None,
        }

    @classmethod
    def of_job(cls, job: Any) -> RunSpec:
        """The spec stored in a job row (`app.db.models.Job`, or anything with its columns)."""
        return cls.model_validate(
            {
                "base_model": job.model,
                "parent_model": job.parent_model,
                "training_file": job.training_file,
                "validation_file": job.validation_file,
                # rows from before the method column are supervised
                "method": {
                    "type": job.method or "supervised",
                    "hyperparameters": job.hyperparameters,
                },
                "integrations": job.integrations or (),
            }
        )
