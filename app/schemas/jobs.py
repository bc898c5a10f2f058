"""Fine-tuning job requests and responses, OpenAI-compatible plus LoRA knobs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from app.schemas.common import Id, Strict, Text

Auto = Literal["auto"]
Suffix = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")]
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]{1,100}$")]
TokenString = Annotated[str, Field(min_length=1, max_length=100)]
LrScheduler = Literal["linear", "cosine", "constant"]
Quantization = Literal["none", "nf4", "int8"]


class Hyperparameters(Strict):
    """User-facing hyperparameters: what may be asked, with its bounds and defaults. "auto"
    is resolved at job creation into the run spec (`app/jobs/spec.py`), which is what runs."""

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    lora_r: Annotated[int, Field(ge=1, le=256)] = 8
    lora_alpha: Annotated[int, Field(ge=1, le=1024)] | None = None
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lora_target_modules: (
        Literal["all-linear"] | Annotated[list[ModuleName], Field(min_length=1, max_length=64)]
    ) = "all-linear"
    max_seq_length: Annotated[int, Field(ge=16, le=65536)] = 1024
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    lr_scheduler: LrScheduler = "linear"
    # "auto": batch_size is the batch per optimizer step, split by the worker into as many
    # micro-batches as its memory plan needs (the same steps, so the same result).
    gradient_accumulation_steps: Auto | Annotated[int, Field(ge=1, le=1024)] = "auto"
    use_rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r) (PEFT's use_rslora)
    use_dora: bool = False  # weight-decomposed LoRA (PEFT's use_dora)
    gradient_checkpointing: Auto | bool = "auto"  # "auto": on only when the job needs it to fit
    # "auto": loss on assistant / completion tokens only, on everything for `text` records.
    train_on_inputs: Auto | bool = "auto"
    # "auto": pack short examples into full sequences when the worker verifies it is exact.
    packing: Auto | bool = "auto"
    # Train the embedding (and output) rows of special tokens, e.g. a chat template's tokens
    # the base never trained: true = the chat template's special tokens and EOS; or a list.
    train_special_tokens: (
        bool | Annotated[list[TokenString], Field(min_length=1, max_length=64)]
    ) = False
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    # Together's name: checkpoints written, evenly spaced over the steps, the last at the
    # end (at most one per step). "auto": one per epoch (n_epochs).
    n_checkpoints: Auto | Annotated[int, Field(ge=1, le=100)] = "auto"
    # The base's precision while training (QLoRA): "nf4" 4-bit NormalFloat, "int8" 8-bit,
    # both through bitsandbytes; the LoRA weights stay in full precision.
    quantization: Quantization = "none"
    # Together's name: full validation-loss evaluations evenly spaced over the steps, during
    # epochs too (besides the one at each checkpoint). Needs a validation_file.
    n_evals: Annotated[int, Field(ge=0, le=100)] = 0
    # Stop (succeeded) after this many evaluations without the full validation loss
    # improving by more than early_stopping_threshold; the model is then the best step's.
    early_stopping_patience: Annotated[int, Field(ge=1, le=100)] | None = None
    early_stopping_threshold: Annotated[float, Field(ge=0, le=100)] = 0.0

    @model_validator(mode="after")
    def _one_learning_rate(self) -> Hyperparameters:
        if self.learning_rate is not None and self.learning_rate_multiplier != "auto":
            raise ValueError("give learning_rate or learning_rate_multiplier, not both")
        return self


class DpoHyperparameters(Hyperparameters):
    """A DPO job's: the supervised knobs (batch_size counts preference pairs) and `beta`.
    OpenAI bounds beta to (0, 2]; "auto" is DPO's usual 0.1 (app/jobs/hyperparameters.py)."""

    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class SupervisedMethod(Strict):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(Strict):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} is given but method.type is {self.type!r}")
        return self

    def nested_hyperparameters(self) -> Hyperparameters | None:
        """The hyperparameters under method.<type>, if given."""
        settings = self.dpo if self.type == "dpo" else self.supervised
        return settings.hyperparameters if settings is not None else None


# Experiment tracking (docs/design.md "Experiment tracking"): OpenAI's `integrations` shape,
# with MLflow as a second member. Only names travel in a job; credentials stay in the
# worker's environment (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, …), and Strict refuses any
# other key, an `api_key` included. The bounds are ours: OpenAI documents none.
TrackerName = Annotated[Text, Field(min_length=1, max_length=128)]
TrackerTag = Annotated[Text, Field(min_length=1, max_length=64)]


class WandbSettings(Strict):
    project: TrackerName
    name: TrackerName | None = None  # None: the job id
    entity: TrackerName | None = None  # None: the API key's default entity
    tags: Annotated[list[TrackerTag], Field(max_length=20)] | None = None


class WandbIntegration(Strict):
    type: Literal["wandb"]
    wandb: WandbSettings


class MlflowSettings(Strict):
    # None: the worker's MLFLOW_TRACKING_URI. Given: it must be one the operator allows
    # (LORAFORGE_MLFLOW_TRACKING_URIS), checked at creation: a URI of the caller's choosing
    # would have the worker send its MLflow credentials, or write files, wherever it says.
    tracking_uri: Annotated[Text, Field(min_length=1, max_length=1000)] | None = None
    experiment_name: TrackerName | None = None  # None: the base model's name
    name: TrackerName | None = None  # the run's name; None: the job id
    tags: Annotated[list[TrackerTag], Field(max_length=20)] | None = None


class MlflowIntegration(Strict):
    type: Literal["mlflow"]
    mlflow: MlflowSettings


def _integration_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"type-{kind}"


# Tagged "type-…": an error's `param` leaves such tags out (app/api/errors.py), so a bad
# project is `integrations.0.wandb.project`, not `integrations.0.wandb.wandb.project`.
Integration = Annotated[
    Annotated[WandbIntegration, Tag("type-wandb")]
    | Annotated[MlflowIntegration, Tag("type-mlflow")],
    Discriminator(
        _integration_tag,
        custom_error_type="invalid_integration",
        custom_error_message="an integration's type must be 'wandb' or 'mlflow'",
    ),
]


class JobCreate(Strict):
    model: Id
    training_file: Annotated[Id, Field(max_length=64)]
    validation_file: Annotated[Id, Field(max_length=64)] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: Suffix | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    integrations: Annotated[list[Integration], Field(max_length=4)] | None = None
    metadata: (
        Annotated[
            dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> JobCreate:
        nested = self.method and self.method.nested_hyperparameters()
        if nested and self.hyperparameters is not None:
            raise ValueError(
                "give hyperparameters either at the top level or under "
                f"method.{self.method_type()}.hyperparameters, not both"
            )
        return self

    @model_validator(mode="after")
    def _one_seed(self) -> JobCreate:
        hp_seed = self.requested_hyperparameters().seed
        if hp_seed is not None and self.seed is not None and hp_seed != self.seed:
            raise ValueError("seed and hyperparameters.seed differ; give one of them")
        return self

    def method_type(self) -> Literal["supervised", "dpo"]:
        return self.method.type if self.method is not None else "supervised"

    def requested_hyperparameters(self) -> Hyperparameters:
        """As asked (a DPO job's as DpoHyperparameters, also when given at the top level)."""
        nested = self.method and self.method.nested_hyperparameters()
        requested = nested or self.hyperparameters or Hyperparameters()
        if self.method_type() == "dpo" and not isinstance(requested, DpoHyperparameters):
            return DpoHyperparameters.model_validate(requested.model_dump(exclude_unset=True))
        return requested

    def requested_seed(self) -> int | None:
        """The seed from the top level or from the hyperparameters (they may not differ)."""
        return self.seed if self.seed is not None else self.requested_hyperparameters().seed


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobRead(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    fine_tuned_model: str | None
    organization_id: str
    result_files: list[str]
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = []  # as given at creation
    # loraforge's own: optimizer steps done and planned, updated every step while it runs
    steps_completed: int | None = None
    steps_planned: int | None = None
    # early stopping ended the job: fine_tuned_model is this step's checkpoint (else null)
    best_step: int | None = None


class EventRead(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class CheckpointRead(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
