"""Data-parallel LoRA training on several devices: one process per rank, torch.distributed.

The job's process is rank 0: it does everything a single-process run does (progress,
cancel checks, validation, checkpoints, the adapter). `data_parallel` launches ranks
1..N-1 as child processes (`peer.py`, like torchrun's workers: one per GPU with NCCL, or
N CPU processes with gloo) that load the same base, take the same steps and write
nothing. Every rank builds the same steps (their order is a pure function of the seed),
trains its share of each (`packing.rank_share`) with each micro-batch's loss divided by
the label count of the WHOLE step, then the ranks sum their LoRA gradients
(`Ranks.reduce`): every rank holds the single-process gradient, clips and steps alike,
so the adapter equals the single-process one up to float summation order.

Why an all-reduce of the LoRA gradients by hand rather than DistributedDataParallel: the
trainable part is small (one flat all-reduce per optimizer step, never per micro-batch),
a rank may have no examples in a step (DDP needs a forward on every rank), and the model
stays the plain PEFT model that checkpoints, saves and resumes as today (no `module.`).

A rank that dies (killed, out of memory) makes the collective of the others fail (gloo at
once; NCCL when its watchdog times out, `TIMEOUT`): rank 0 raises `RankLost`, the attempt
ends without an outcome for the job and the job is retried from its last checkpoint.
Rank 0 kills its peers when it leaves, and a peer dies with rank 0 (`die_with`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from worker.training.data import Example

# Longest wait in a collective (and for the peers to load their base): rank 0 validates
# and publishes checkpoints while the peers wait for the next step. torch's own default.
TIMEOUT = timedelta(minutes=30)
READY_POLL_SECONDS = 0.2


class RankLost(Exception):
    """Another rank of the run died or stopped answering: this attempt cannot go on."""


@dataclass
class Ranks:
    """Which rank this process is, of how many; with one (the default) every method is free."""

    rank: int = 0
    world: int = 1
    seed: int = 0
    peers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # rank 0's: 1..N-1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes checkpoints and the adapter."""
        return self.rank == 0

    @property
    def share(self) -> dict[str, int]:
        """`packing.steps`' arguments for this rank's part of each step."""
        return {"rank": self.rank, "world": self.world}

    def begin_step(self, step: int) -> None:
        """Ranks past 0 draw dropout from a stream of (seed, rank, step): a resumed run
        replays them without their RNG in the checkpoint (rank 0's is there, as alone)."""
        if self.rank:
            import torch

            torch.manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_003 + step)

    def reduce(self, params: list[Any], loss_sum: float) -> float:
        """Sum the ranks' gradients of `params` (in place) and their summed losses."""
        if self.world == 1:
            return loss_sum
        self.check_peers()
        try:
            return _all_reduce(params, loss_sum)
        except RuntimeError as exc:  # torch's DistBackendError is one
            self.check_peers()
            raise RankLost(f"a collective of rank {self.rank} failed: {exc}") from exc

    def check_peers(self) -> None:
        for rank, peer in enumerate(self.peers, start=1):
            if peer.poll() is not None:
                raise RankLost(f"training rank {rank} exited (code {peer.returncode})")


def _all_reduce(params: list[Any], loss_sum: float) -> float:
    """One flat all-reduce of every gradient plus a has-gradient flag per parameter: a
    parameter no rank touched keeps no gradient (AdamW then skips it, as alone)."""
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = params[0].device
    flags = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    for p, g, seen in zip(params, grads, flat[offset:].tolist(), strict=True):
        p.grad = g if seen else None
    loss = torch.tensor([loss_sum], dtype=torch.float64, device=device)
    dist.all_reduce(loss)
    return float(loss.item())


@dataclass
class PeerJob:
    """What a peer rank needs to train the same run as rank 0 (JSON in the run's folder)."""

    world: int
    base_model_ref: str
    quantization: str
    device: str  # rank 0's ("cpu", "cuda:0"); rank r takes cuda:r
    hyperparameters: dict[str, Any]  # SupervisedHyperparameters as it runs
    examples: list[list[list[int]]]  # [input_ids, labels] per training example
    trainable_token_ids: list[int]
    init_adapter: str | None
    resume_from: str | None
    threads: int  # torch intra-op threads per rank

    def write(self, folder: Path) -> Path:
        path = folder / "peer-job.json"
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> PeerJob:
        return cls(**json.loads(path.read_text()))

    def training_examples(self) -> list[Example]:
        return [Example(input_ids=ids, labels=labels) for ids, labels in self.examples]

    @property
    def kind(self) -> str:
        return "NCCL, one GPU each" if self.device.startswith("cuda") else "gloo, CPU processes"

    def device_of(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device.startswith("cuda") else "cpu"


def peer_job(
    *,
    world: int,
    base_model_ref: str,
    quantization: str,
    model: Any,
    hyperparameters: Any,
    examples: list[Example],
    trainable_token_ids: tuple[int, ...],
    init_adapter: Path | None,
    resume_from: Path | None,
) -> PeerJob:
    """What the peers of rank 0 need, from what rank 0 trains with (`model` on its device);
    each rank gets 1/N of rank 0's torch threads (CPU ranks share the cores)."""
    import torch

    return PeerJob(
        world=world,
        base_model_ref=base_model_ref,
        quantization=quantization,
        device=str(next(model.parameters()).device),
        hyperparameters=hyperparameters.model_dump(mode="json"),
        examples=[[e.input_ids, e.labels] for e in examples],
        trainable_token_ids=list(trainable_token_ids),
        init_adapter=str(init_adapter) if init_adapter else None,
        resume_from=str(resume_from) if resume_from else None,
        threads=max(1, torch.get_num_threads() // world),
    )


@contextmanager
def data_parallel(job: PeerJob | None, scratch: Path | None) -> Iterator[Ranks]:
    """Rank 0 of `job.world` ranks (None or a world of 1: training alone). Launches the
    peers, waits until they have loaded their base, joins the process group; on leaving
    (done, paused, stopped early, cancelled or failed) kills the peers and leaves the group."""
    if job is None or job.world == 1:
        yield Ranks()
        return
    import torch

    _check_devices(job)
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    with tempfile.TemporaryDirectory(prefix="loraforge-ranks-", dir=scratch) as folder:
        peers = [_launch(job.write(Path(folder)), rank) for rank in range(1, job.world)]
        ranks = Ranks(rank=0, world=job.world, seed=job.hyperparameters["seed"], peers=peers)
        try:
            _wait_ready(Path(folder), ranks)
            join(Path(folder), 0, job)
            yield ranks
        finally:  # the last all-reduce has returned, or rank 0 stopped alone: peers are done
            _stop(peers)
            _leave()
            torch.set_num_threads(threads)


def join(folder: Path, rank: int, job: PeerJob) -> None:
    """Join the run's process group (a file store in its folder: no port to pick)."""
    import torch
    import torch.distributed as dist

    cuda = job.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(job.device_of(rank))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{folder / 'rendezvous'}",
        rank=rank,
        world_size=job.world,
        timeout=TIMEOUT,
    )


def mark_ready(folder: Path, rank: int) -> None:
    (folder / f"ready-{rank}").touch()


def _check_devices(job: PeerJob) -> None:
    import torch

    if job.device.startswith("cuda") and torch.cuda.device_count() < job.world:
        raise RuntimeError(
            f"LORAFORGE_GPUS_PER_JOB={job.world} but this worker sees "
            f"{torch.cuda.device_count()} GPUs"
        )


def _launch(job_file: Path, rank: int) -> subprocess.Popen[bytes]:
    import worker

    root = str(Path(worker.__file__).resolve().parents[1])  # where `worker` is importable
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    peer = ["-m", "worker.training.peer", str(job_file), str(rank), str(os.getpid())]
    return subprocess.Popen([sys.executable, *peer], env=dict(os.environ, PYTHONPATH=path))


def _wait_ready(folder: Path, ranks: Ranks) -> None:
    """Until every peer has loaded its base (a dead one raises `RankLost` at once)."""
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while not all((folder / f"ready-{r}").exists() for r in range(1, ranks.world)):
        ranks.check_peers()
        if time.monotonic() > deadline:
            raise RankLost(f"the training ranks were not ready after {TIMEOUT}")
        time.sleep(READY_POLL_SECONDS)


def _stop(peers: list[subprocess.Popen[bytes]]) -> None:
    for peer in peers:
        if peer.poll() is None:
            peer.kill()
        peer.wait()


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
