"""A peer rank of a data-parallel run (`distributed.py`): `python -m worker.training.peer
<peer-job.json> <rank> <parent pid>`, launched by rank 0.

It loads the same base, prepares it as rank 0 did (packing), says it is ready, joins the
process group and trains its share of every step; it writes nothing (its adapter goes to
a temporary folder it removes) and reports nothing (rank 0 does). It dies with rank 0.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from app.jobs.spec import SupervisedHyperparameters
from app.ml.loading import load_base_model, load_tokenizer
from worker.heap import fix_mmap_threshold
from worker.lifeline import die_with
from worker.training.distributed import PeerJob, Ranks, join, mark_ready
from worker.training.loop import train_lora
from worker.training.packing import enable_packing


def main(argv: list[str]) -> int:
    job_file, rank, parent = Path(argv[0]), int(argv[1]), int(argv[2])
    die_with(parent)
    fix_mmap_threshold()  # as rank 0's process: the plan counts live tensors
    import torch

    job = PeerJob.read(job_file)
    torch.set_num_threads(job.threads)
    hp = SupervisedHyperparameters.model_validate(job.hyperparameters)
    model = load_base_model(
        job.base_model_ref, device=job.device_of(rank), quantization=job.quantization
    )
    if hp.packing and not enable_packing(model):  # rank 0 found it exact on the same base
        raise RuntimeError("packing is not exact on this rank's base")
    mark_ready(job_file.parent, rank)
    join(job_file.parent, rank, job)
    with tempfile.TemporaryDirectory(prefix=f"loraforge-rank{rank}-") as out:
        train_lora(
            model=model,
            tokenizer=load_tokenizer(job.base_model_ref),
            train_examples=job.training_examples(),
            valid_examples=[],  # rank 0 validates
            hyperparameters=hp,
            out_dir=Path(out),
            trainable_token_ids=tuple(job.trainable_token_ids),
            init_adapter=Path(job.init_adapter) if job.init_adapter else None,
            resume_from=Path(job.resume_from) if job.resume_from else None,
            ranks=Ranks(rank=rank, world=job.world, seed=hp.seed),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
