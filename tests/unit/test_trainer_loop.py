"""Pure parts of the training loop on a tiny random Llama built in memory: data order, encoding, packing, the loss."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from langmerge.api.expert import Lora, Training  # noqa: E402
from langmerge_trainer.data import Example  # noqa: E402
from langmerge_trainer.evaluate import (  # noqa: E402
    IGNORE,
    Encoded,
    completion_loss_sum,
    encode_example,
    evaluate_encoded,
    pad_batch,
)
from langmerge_trainer.train import (  # noqa: E402
    TrainingLoop,
    attach_lora,
    lr_lambda,
    pack_batch,
    plan_epoch,
    seed_everything,
)

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def random_items(n: int, seed: int = 0, low: int = 4, high: int = 20) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(low, high, (1,), generator=gen))
        ids = [1, *torch.randint(3, VOCAB, (length,), generator=gen).tolist(), 2]
        cut = 1 + length // 2
        items.append(Encoded(input_ids=tuple(ids), labels=tuple([IGNORE] * cut + ids[cut:])))
    return items


class CharTokenizer:
    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}


@pytest.mark.parametrize("batching", ["shuffled", "length-grouped", "packed"])
def test_every_example_once_per_epoch_and_deterministic(batching: str) -> None:
    lengths = [5 + (i * 7) % 23 for i in range(53)]
    kwargs = {"seed": 3, "batch_size": 4, "batching": batching, "max_seq_length": 40}
    plan = plan_epoch(lengths, epoch=0, **kwargs)
    seen = Counter(i for step in plan for row in step for i in row)
    assert seen == Counter(range(53))
    assert plan == plan_epoch(lengths, epoch=0, **kwargs)
    assert plan != plan_epoch(lengths, epoch=1, **kwargs)
    assert all(1 <= len(step) <= 4 for step in plan)
    if batching == "packed":
        assert all(sum(lengths[i] for i in row) <= 40 for step in plan for row in step)
        assert any(len(row) > 1 for step in plan for row in step)
    if batching == "length-grouped":
        assert max(lengths) in [lengths[row[0]] for row in plan[0]]


def test_encoding_masks_the_prompt_and_fits_the_length() -> None:
    tok = CharTokenizer()
    short = encode_example(tok, Example(prompt="abc", completion="de"), 64)
    assert len(short.input_ids) == 1 + 3 + 2 + 1
    assert short.labels[:4] == (IGNORE,) * 4 and short.labels[4:] == short.input_ids[4:]
    assert short.input_ids[-1] == 2
    long = encode_example(tok, Example(prompt="p" * 50 + "END", completion="c" * 40), 32)
    # Budget 31 after bos: the completion keeps half (15 of 41), the prompt its last 16 tokens (ending in "END").
    assert len(long) == 32 and long.completion_tokens == 15
    assert long.input_ids[0] == 1 and long.input_ids[14:17] == tuple(tok("END")["input_ids"])
    only_prompt_end = encode_example(tok, Example(prompt="x" * 10 + "yz", completion="q"), 8)
    assert only_prompt_end.input_ids[-2:] == (tok("q")["input_ids"][0], 2)
    assert only_prompt_end.input_ids[-4:-2] == tuple(tok("yz")["input_ids"])  # the prompt keeps its end


def test_packed_examples_do_not_see_each_other() -> None:
    model = tiny_llama()
    items = random_items(3, seed=1)
    with torch.no_grad():
        packed, n_packed = completion_loss_sum(model, pack_batch([items], 0))
        separate = [completion_loss_sum(model, pad_batch([item], 0)) for item in items]
    assert n_packed == sum(n for _loss, n in separate)
    assert float(packed) == pytest.approx(sum(float(loss) for loss, _n in separate), rel=1e-5)
    batch = pack_batch([items[:2], items[2:]], 0)
    assert batch.position_ids is not None and batch.attention_mask is None
    assert batch.position_ids[0, len(items[0])] == 0  # positions restart at each example
    assert batch.tokens == sum(len(i) for i in items)


def test_selective_head_equals_the_plain_loss() -> None:
    model = tiny_llama()
    items = random_items(4, seed=2)
    batch = pad_batch(items, 0)
    with torch.no_grad():
        ours, count = completion_loss_sum(model, batch)
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert float(ours) / count == pytest.approx(float(plain), rel=1e-5)
    metrics = evaluate_encoded(model, items, pad_token_id=0, batch_size=3)
    assert metrics.eval_loss == pytest.approx(float(plain), rel=1e-5)
    assert metrics.examples == 4 and 0 <= (metrics.token_accuracy or 0) <= 1


def test_lr_schedule() -> None:
    f = lr_lambda(2, 10)
    assert [round(f(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert lr_lambda(0, 3)(0) == 1.0


def _train(training: Training, steps: int | None = None) -> dict[str, Any]:
    seed_everything(training.seed)
    model = attach_lora(tiny_llama(), Lora(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    loop = TrainingLoop(model, random_items(24, seed=5), training, pad_token_id=0, device=torch.device("cpu"))
    while not loop.done and (steps is None or loop.step < steps):
        loop.train_step()
    return loop.trainable_state()


@pytest.mark.parametrize("option", [{"gradient_accumulation_steps": 3}, {"gradient_checkpointing": True}])
def test_memory_options_do_not_change_the_result(option: dict[str, Any]) -> None:
    base = {"epochs": 1, "batch_size": 6, "learning_rate": 1e-2, "seed": 1, "max_seq_length": 32}
    reference = _train(Training(**base))
    if option.get("gradient_checkpointing"):
        seed_everything(1)
        model = attach_lora(
            tiny_llama(),
            Lora(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
            gradient_checkpointing=True,
        )
        loop = TrainingLoop(
            model, random_items(24, seed=5), Training(**base), pad_token_id=0, device=torch.device("cpu")
        )
        while not loop.done:
            loop.train_step()
        other = loop.trainable_state()
    else:
        other = _train(Training(**base, **option))
    assert reference.keys() == other.keys()
    for name in reference:
        torch.testing.assert_close(other[name], reference[name], rtol=1e-4, atol=1e-6)
    assert any(float(t.abs().sum()) > 0 for n, t in reference.items() if "lora_B" in n)


def test_same_seed_same_weights() -> None:
    training = Training(epochs=1, batch_size=4, learning_rate=1e-2, seed=9, max_seq_length=32)
    a, b = _train(training), _train(training)
    assert all(torch.equal(a[n], b[n]) for n in a)
