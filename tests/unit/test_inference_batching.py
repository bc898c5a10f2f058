"""The batching engine under concurrency: many adapters and the base in the same forward.

The reference for every (adapter, prompt) is plain PEFT greedy decoding of that request
alone (`PeftModel` + `set_adapter`, `model.generate`), independent of the engine.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from app.inference import AdapterRef, InferenceEngine  # noqa: E402
from app.ml.loading import load_base_model, load_tokenizer  # noqa: E402
from app.storage import file_sha256  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 10
# (rank, targets): three ranks and three target sets, so one batch mixes all of them.
SPECS = [
    (4, ["q_proj", "v_proj"]),
    (8, "all-linear"),
    (16, ["gate_proj", "up_proj", "down_proj"]),
    (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (4, "all-linear"),
    (16, ["q_proj", "v_proj"]),
    (2, ["o_proj", "down_proj"]),
    (8, ["q_proj", "v_proj"]),
    (16, "all-linear"),
    (4, ["up_proj"]),
]
PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "def main():",
    "SELECT * FROM",
    "Dear team,",
    "x = 1 + 2",
    "It was a dark and stormy",
    "To be or not",
]


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[AdapterRef]:
    """Ten adapters with random, non-zero A and B (init_lora_weights=False)."""
    refs = []
    for index, (rank, targets) in enumerate(SPECS):
        torch.manual_seed(100 + index)
        model = peft.get_peft_model(
            load_base_model(base_dir, device="cpu"),
            peft.LoraConfig(
                r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=targets
            ),
        )
        out = tmp_path_factory.mktemp(f"adapter{index}")
        model.save_pretrained(str(out), safe_serialization=True)
        sha = file_sha256(out / "adapter_model.safetensors")
        refs.append(AdapterRef(f"ft:tiny:org:a{index}:ftjob-{index:04d}", out, sha))
    return refs


@pytest.fixture(scope="module")
def references(base_dir: Path, adapters: list[AdapterRef]) -> dict[tuple, list[int]]:
    """Greedy token ids per (adapter id or None, prompt): one request at a time, PEFT."""
    tokenizer = load_tokenizer(base_dir)
    model = peft.PeftModel.from_pretrained(
        load_base_model(base_dir, device="cpu"), str(adapters[0].path), adapter_name="a0"
    )
    for index, ref in enumerate(adapters[1:], start=1):
        model.load_adapter(str(ref.path), adapter_name=f"a{index}")
    model.eval()
    found = {}
    for key, index in [(None, None)] + [(ref.id, i) for i, ref in enumerate(adapters)]:
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer(prompt).input_ids])
            if index is None:
                with model.disable_adapter():
                    out = _generate(model, ids, tokenizer)
            else:
                model.set_adapter(f"a{index}")
                out = _generate(model, ids, tokenizer)
            found[(key, prompt)] = out
    return found


def _generate(model, ids, tokenizer) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def expected_text(tokenizer, tokens: list[int], max_tokens: int) -> str:
    tokens = tokens[:max_tokens]
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_references_differ_per_adapter(references, adapters):
    """Guards the test below: each adapter really changes the output of the base."""
    for prompt in PROMPTS[:3]:
        outputs = [references[(None, prompt)]] + [references[(a.id, prompt)] for a in adapters]
        assert len({tuple(o) for o in outputs}) == len(outputs), prompt


@pytest.mark.slow
def test_1000_concurrent_requests_over_10_adapters_and_base_never_mix_up(
    base_dir, adapters, references
):
    tokenizer = load_tokenizer(base_dir)
    engine = InferenceEngine(
        base_models={"tiny": str(base_dir)},
        max_loaded_adapters=10,
        max_batch_size=8,
        device="cpu",
    )
    rng = random.Random(0)
    choices = [None, *adapters]
    # varying lengths make rows join and leave the batch at different steps
    jobs = [
        (rng.choice(choices), rng.choice(PROMPTS), rng.randint(1, MAX_TOKENS)) for _ in range(1000)
    ]

    def run(job):
        adapter, prompt, max_tokens = job
        return engine.generate(
            base_model="tiny",
            adapter=adapter,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
        ).text

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outputs = list(pool.map(run, jobs))
        info = engine.stats()["base_models"][0]
    finally:
        engine.close()
    mixups = [
        (adapter.id if adapter else None, prompt, max_tokens, got)
        for (adapter, prompt, max_tokens), got in zip(jobs, outputs, strict=True)
        if got
        != expected_text(
            tokenizer, references[(adapter.id if adapter else None, prompt)], max_tokens
        )
    ]
    assert mixups == []
    # it really batched: several rows and several adapters per forward pass
    assert info["peak_batch"] > 1 and info["mixed_steps"] > 0, info
