"""The defect a benchmark run found, on tiny classifiers trained by the trainer's own code: merging experts with one
that never saw a label erased that label from the merged model (en and zh-Hant lost 20 points, no "psychology"
prediction anywhere). Three experts (en, zh, nl) classify over art, money and psychology; nl's data has no
psychology. Merged with the experts' label counts, the merged model still predicts psychology on the en and zh
psychology examples; merged as before (heads averaged by the language weights), it does not.

No S3 here: the experts are trained with ``prepare_training`` + ``TrainingLoop`` (what a training Job runs) and merged
with :func:`merge_adapters` (what a merge Job runs); the label counts are what the trainer records in the manifest.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from langmerge.api.expert import LanguageExpertSpec
from langmerge_trainer.data import Example, LoadedData, label_counts
from langmerge_trainer.merge.engine import AdapterInput, merge_adapters
from langmerge_trainer.train import TrainingLoop, prepare_training, save_adapter

LABELS = ["art", "money", "psychology"]
#: Each language's words for each label (its "translations"), and its filler words.
WORDS = {
    "en": {
        "art": ["painting", "museum", "sculpture", "gallery", "canvas"],
        "money": ["bank", "price", "coins", "salary", "budget"],
        "psychology": ["mind", "dream", "anxiety", "therapy", "memory"],
        "filler": ["the", "a", "is", "of", "and", "very", "this"],
    },
    "zh": {
        "art": ["huihua", "bowuguan", "diaosu", "hualang", "huabu"],
        "money": ["yinhang", "jiage", "yingbi", "gongzi", "yusuan"],
        "psychology": ["xinling", "mengjing", "jiaolv", "zhiliao", "jiyi"],
        "filler": ["de", "shi", "zhe", "hen", "le", "ge", "zai"],
    },
    "nl": {
        "art": ["schilderij", "museumzaal", "beeldhouwwerk", "galerie", "doek"],
        "money": ["bankrekening", "prijs", "munten", "salaris", "begroting"],
        "psychology": ["geest", "droom", "angst", "therapie", "geheugen"],
        "filler": ["de", "het", "een", "is", "van", "en", "erg"],
    },
}
#: nl never saw psychology (the benchmark's nl expert had no psychology examples).
LABELS_OF = {"en": LABELS, "zh": LABELS, "nl": ["art", "money"]}
PER_LABEL = 40


def examples(language: str, label: str, count: int, seed: int) -> list[Example]:
    rng = random.Random(f"{language}-{label}-{seed}")
    words = WORDS[language]
    out = []
    for _ in range(count):
        text = rng.sample(words["filler"], 3) + rng.sample(words[label], 2)
        rng.shuffle(text)
        out.append(Example(prompt=" ".join(text), completion=label))
    return out


def spec(language: str) -> LanguageExpertSpec:
    return LanguageExpertSpec.model_validate(
        {
            "language": language,
            "task": "topic",
            "taskType": "sequence-classification",
            "labels": LABELS,
            "baseModel": {"uri": "s3://unused/base"},
            "dataset": {"uri": f"s3://unused/data/{language}"},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["query", "value", "dense"]},
            "training": {"epochs": 6, "learningRate": 2e-2, "batchSize": 8, "maxSeqLength": 16, "seed": 3},
            "resources": {"gpus": 0},
        }
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from langmerge_trainer.sample import build_tiny_bert

    texts = [" ".join(ws) for words in WORDS.values() for ws in words.values()] * 4
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts, vocab_size=256)


@pytest.fixture(scope="module")
def experts(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, int]]]:
    """Each language's trained adapter folder and its label counts (as the trainer records them)."""
    device = torch.device("cpu")
    out = {}
    folder = tmp_path_factory.mktemp("experts")
    for language, labels in LABELS_OF.items():
        train = [e for label in labels for e in examples(language, label, PER_LABEL, seed=0)]
        data = LoadedData(train=train, eval=train[:8], skipped_lines=0, files=[])
        prepared = prepare_training(spec(language), base_dir, data, device)
        loop = TrainingLoop(
            prepared.model,
            prepared.train_items,
            spec(language).training,
            pad_token_id=prepared.pad_token_id,
            device=device,
            objective=prepared.objective,
        )
        while not loop.done:
            loop.train_step()
        out[language] = (save_adapter(prepared.model, folder / language), label_counts(data.train, LABELS))
    return out


def psychology_recall(merged_dir: Path, language: str) -> float:
    """The share of the language's held-out psychology examples the merged classifier labels psychology."""
    from langmerge_trainer.classify import evaluate_labelled
    from langmerge_trainer.evaluate import load_tokenizer
    from langmerge_trainer.merge.evaluation import load_model

    model = load_model(merged_dir, torch.device("cpu"), LABELS)
    held_out = examples(language, "psychology", 30, seed=1)
    metrics = evaluate_labelled(model, load_tokenizer(merged_dir), held_out, LABELS, max_seq_length=16)
    assert metrics.accuracy is not None
    return metrics.accuracy


def test_the_counts_record_the_missing_label(experts: dict[str, tuple[Path, dict[str, int]]]) -> None:
    assert experts["nl"][1] == {"art": PER_LABEL, "money": PER_LABEL, "psychology": 0}
    assert experts["en"][1] == dict.fromkeys(LABELS, PER_LABEL)


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_a_label_one_expert_lacks_survives_the_merge(
    base_dir: Path, experts: dict[str, tuple[Path, dict[str, int]]], tmp_path: Path, method: str
) -> None:
    parameters = {
        "weights": {},
        "include_modules": [],
        "exclude_modules": [],
        **({"density": 1.0} if method == "ties" else {}),
    }

    def merged(with_counts: bool) -> Path:
        inputs = [
            AdapterInput(lang, path, labels=tuple(LABELS), label_counts=counts if with_counts else None)
            for lang, (path, counts) in experts.items()
        ]
        out = tmp_path / ("support" if with_counts else "averaged")
        merge_adapters(base_dir, inputs, method, parameters, "full-weights", None, out, device="cpu")
        return out

    fixed, before = merged(with_counts=True), merged(with_counts=False)
    for language in ("en", "zh"):
        recall, recall_before = psychology_recall(fixed, language), psychology_recall(before, language)
        print(f"{method} {language}: psychology recall {recall:.2f} by label support, {recall_before:.2f} before")
        assert recall >= 0.8, (language, recall)
        # the old merge (nl's pushed-down row averaged in) lost the label
        assert recall >= recall_before + 0.3, (language, recall, recall_before)
