"""A collapsed training run is trained again with the next seed until it is clean or out of attempts, every attempt
recorded and costed (langmerge_trainer.bench.runner.train_all with its pool of trainer processes replaced)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from langmerge.api.expert import Metrics
from langmerge_trainer.bench.runner import RERUN_SEED_STEP, Role, Trained, TrainRun, train_all
from langmerge_trainer.collapse import Verdict


class _Stub:
    """The parts of a WorkloadRun train_all uses; a run collapses when its training seed is in ``collapsing``."""

    def __init__(self, collapsing: set[tuple[str, int]], trunk: bool = False) -> None:
        self.ctx = SimpleNamespace()
        self.collapsing = collapsing
        self.pools: list[list[str]] = []
        self.trunk = trunk
        self.inits: dict[tuple[str, int], int | None] = {}

    def roles(self) -> list[Role]:
        init = "trunk" if self.trunk else None
        out = [Role("trunk", "mul", ("it", "ja"), "trunk", "trunk")] if self.trunk else []
        return [
            *out,
            Role("expert:it", "it", ("it",), "initial", "it", init),
            Role("joint", "mul", ("it", "ja"), "initial", "joint"),
        ]

    def train_task(self, role: Role, seed: int, init: Any = None) -> Any:
        self.inits[(role.key, seed)] = init.seed if init is not None else None
        return SimpleNamespace(role=role.key, seed=seed)

    def verdict(self, role: Role, run: Any) -> Verdict:
        if (role.key, run.seed) in self.collapsing:
            return Verdict(True, "predicts a for 9 of 9 inputs (100%)")
        return Verdict(False)


def _pool(stub: _Stub) -> Callable[[Any, dict[str, Any], Callable[[str], None]], dict[str, TrainRun]]:
    def train(_ctx: Any, tasks: dict[str, Any], on_done: Callable[[str], None]) -> dict[str, TrainRun]:
        stub.pools.append(sorted(tasks))
        out = {}
        for key, task in tasks.items():
            manifest = SimpleNamespace(
                cost=SimpleNamespace(wall_seconds=10.0, cpu_seconds=10.0, gpu_seconds=0.0, device="cpu"),
                steps=5,
                tokens_trained=100,
                examples_train=40,
                metrics=Metrics(accuracy=0.5),
            )
            out[key] = TrainRun(f"{task.role}-s{task.seed}", "it", manifest, seed=task.seed)  # type: ignore[arg-type]
            on_done(key)
        return out

    return train


def test_collapsed_runs_are_rerun_with_the_next_seeds_and_every_attempt_costs() -> None:
    stub = _Stub({("joint", 0), ("joint", RERUN_SEED_STEP), ("expert:it", 1)})
    done: list[str] = []
    trained = train_all(stub, [0, 1], done.append, train=_pool(stub))  # type: ignore[arg-type]
    # one pool with everything, then the collapsed ones only
    assert stub.pools == [
        ["0|expert:it", "0|joint", "1|expert:it", "1|joint"],
        ["0|joint", "1|expert:it"],
        ["0|joint"],
    ]
    joint: Trained = trained[0]["joint"]
    assert [r.seed for r, _ in joint.attempts] == [0, 1000, 2000] and not joint.collapsed.collapsed
    assert joint.cost()["cpu_seconds"] == 30.0 and joint.cost()["attempts"] == 3
    assert [a["collapsed"] for a in joint.record()["attempts"]] == [True, True, False]
    assert [r.seed for r, _ in trained[1]["expert:it"].attempts] == [1, 1001]
    assert len(done) == 7


def test_a_run_still_collapsed_after_the_last_attempt_stays_collapsed() -> None:
    stub = _Stub({("joint", 0), ("joint", RERUN_SEED_STEP)})
    trained = train_all(stub, [0], lambda _key: None, max_attempts=2, train=_pool(stub))  # type: ignore[arg-type]
    joint = trained[0]["joint"]
    assert len(joint.attempts) == 2 and joint.collapsed.collapsed and joint.run.seed == RERUN_SEED_STEP


def test_experts_start_from_their_seeds_clean_trunk_once_it_is_settled() -> None:
    stub = _Stub({("trunk", 0)}, trunk=True)
    trained = train_all(stub, [0, 1], lambda _key: None, train=_pool(stub))  # type: ignore[arg-type]
    # trunks and joint models first; seed 1's expert as soon as its trunk is clean; seed 0's after the rerun
    assert stub.pools == [
        ["0|joint", "0|trunk", "1|joint", "1|trunk"],
        ["0|trunk", "1|expert:it"],
        ["0|expert:it"],
    ]
    assert stub.inits[("expert:it", 1)] == 1 and stub.inits[("expert:it", 0)] == RERUN_SEED_STEP
    assert [r.seed for r, _ in trained[0]["trunk"].attempts] == [0, RERUN_SEED_STEP]
