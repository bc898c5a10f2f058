"""DPO learning figure, the usual recipe: SFT, then DPO against the SFT adapter.

`python -m bench.dpo_learning [--seed 0]`. Tiny random-init model (2 layers, hidden 128, its
character tokenizer: `app/ml/tiny_model.py`), 16 training prompts and 8 held-out ones; each
prompt has two answers, its word in capitals (preferred, "AMBER.") and in lower case
(rejected, "amber.").

1. SFT on both answers of every training prompt (32 chat records, 30 epochs at 3e-3), so the
   model gives each about half the time;
2. DPO on the 16 pairs preferring the capitals (10 epochs at 1e-3, beta 0.1), `model`
   the SFT adapter: it is the reference, and the new adapter starts from it.

Printed after each stage: the greedy answers to the 16 training prompts (preferred /
rejected / other), and the mean preferred-minus-rejected log-probability margin on the 8
held-out pairs. The issue's TRL figures on the same recipe are printed beside ours.
`run_recipe` is also the slow test's (tests/worker/test_dpo_learning.py).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

N_TRAIN, N_HELD_OUT = 16, 8
WORDS = [
    "amber", "birch", "cedar", "delta", "ember", "flint", "grove", "haven", "ivory", "jolly",
    "karma", "lunar", "maple", "noble", "oasis", "pearl", "quill", "raven", "solar", "tulip",
    "umber", "vivid", "wheat", "xenon",
]  # fmt: skip
# Each prompt's two answers start with different tokens of their own ("AMBER." / "amber."),
# so which one SFT makes greedy varies by prompt; the preference (capitals) is shared, so a
# model that learnt it prefers it on held-out prompts too.
PREFERRED, REJECTED = "{}.", "{}."
TRL_FIGURES = "TRL (issue 12): after SFT preferred 6, rejected 8 of 16; after DPO 5, 0"


@dataclass
class Stage:
    name: str
    preferred: int  # greedy answers to the training prompts that are the preferred one
    rejected: int
    held_out_margin: float  # mean log p(preferred) - log p(rejected), held-out pairs

    def line(self) -> str:
        return (
            f"{self.name:<10} greedy answers of {N_TRAIN}: preferred {self.preferred:>2}, "
            f"rejected {self.rejected:>2}, other {N_TRAIN - self.preferred - self.rejected:>2}; "
            f"held-out margin {self.held_out_margin:+.2f}"
        )


def pairs(first: int, count: int) -> list[dict[str, Any]]:
    """Preference records (OpenAI's shape) for prompts first … first + count - 1."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Say the word for item {i}."}]},
            "preferred_output": [
                {"role": "assistant", "content": PREFERRED.format(WORDS[i].upper())}
            ],
            "non_preferred_output": [{"role": "assistant", "content": REJECTED.format(WORDS[i])}],
        }
        for i in range(first, first + count)
    ]


def sft_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Both answers of every pair, as chat records."""
    return [
        {"messages": record["input"]["messages"] + record[key]}
        for record in records
        for key in ("preferred_output", "non_preferred_output")
    ]


def run_recipe(
    work: Path, *, seed: int = 0, sft_epochs: int = 30, dpo_epochs: int = 10
) -> list[Stage]:
    """SFT then DPO (see the module docstring); the figures after each stage."""
    import torch
    from peft import PeftModel

    from app.jobs.hyperparameters import resolve
    from app.ml.loading import load_base_model, load_tokenizer
    from app.ml.tiny_model import build_tiny_model
    from app.schemas.jobs import DpoHyperparameters, Hyperparameters
    from worker.training.data import encode_dataset
    from worker.training.loop import train_lora
    from worker.training.preference_data import encode_preferences

    model_dir = build_tiny_model(work / "base", hidden_size=128, intermediate_size=256)
    tokenizer = load_tokenizer(model_dir)
    train, held_out = pairs(0, N_TRAIN), pairs(N_TRAIN, N_HELD_OUT)
    knobs = {"batch_size": 4, "lora_r": 16, "lora_alpha": 32, "max_seq_length": 64}
    knobs |= {"n_checkpoints": 1}  # the run's end only: checkpoints are not what is measured
    sft = resolve(
        Hyperparameters(n_epochs=sft_epochs, learning_rate=3e-3, **knobs),
        n_examples=2 * N_TRAIN,
        seed=seed,
    )
    train_lora(
        model=load_base_model(model_dir, device="cpu"),
        tokenizer=tokenizer,
        train_examples=encode_dataset(tokenizer, sft_records(train), max_seq_length=64),
        valid_examples=[],
        hyperparameters=sft,
        out_dir=work / "sft",
    )
    dpo = resolve(
        DpoHyperparameters(n_epochs=dpo_epochs, learning_rate=1e-3, beta=0.1, **knobs),
        n_examples=N_TRAIN,
        seed=seed,
    )
    train_lora(
        model=load_base_model(model_dir, device="cpu"),
        tokenizer=tokenizer,
        train_examples=encode_preferences(tokenizer, train, max_seq_length=64),
        valid_examples=[],
        hyperparameters=dpo,
        out_dir=work / "dpo",
        init_adapter=work / "sft",
    )
    stages = []
    for name in ("sft", "dpo"):
        model = PeftModel.from_pretrained(load_base_model(model_dir, device="cpu"), work / name)
        with torch.no_grad():
            stages.append(measure(name.upper(), model.eval(), tokenizer, train, held_out))
    return stages


def measure(
    name: str, model: Any, tokenizer: Any, train: list[dict], held_out: list[dict]
) -> Stage:
    from worker.training.preference_data import encode_preferences

    answers = [
        greedy(model, tokenizer, ex)
        for ex in encode_preferences(tokenizer, train, max_seq_length=64)[::2]
    ]
    wanted = [
        (r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"])
        for r in train
    ]
    examples = encode_preferences(tokenizer, held_out, max_seq_length=64)
    logps = [answer_logp(model, example) for example in examples]
    margins = [logps[k] - logps[k + 1] for k in range(0, len(logps), 2)]
    return Stage(
        name,
        preferred=sum(a == good for a, (good, _) in zip(answers, wanted, strict=True)),
        rejected=sum(a == bad for a, (_, bad) in zip(answers, wanted, strict=True)),
        held_out_margin=sum(margins) / len(margins),
    )


def greedy(model: Any, tokenizer: Any, example: Any, max_new_tokens: int = 24) -> str:
    """Greedy decoding of the example's prompt (its unlabelled prefix), stopping at EOS."""
    import torch

    ids = example.input_ids[: next(k for k, x in enumerate(example.labels) if x != -100)]
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return str(tokenizer.decode(new))


def answer_logp(model: Any, example: Any) -> float:
    """log p(answer | prompt): the example's label tokens, summed."""
    import torch

    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
    targets = torch.tensor(example.labels[1:])
    logps = torch.log_softmax(logits.float(), dim=-1)
    mask = targets != -100
    return float(logps[mask].gather(1, targets[mask].unsqueeze(1)).sum())


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lf-dpo-") as work:
        for stage in run_recipe(Path(work), seed=args.seed):
            print(stage.line())
    print(TRL_FIGURES)


if __name__ == "__main__":
    main()
