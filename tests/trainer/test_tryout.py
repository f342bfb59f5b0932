"""``langmerge-trainer try``: the models come from S3 and answer as the same folders loaded directly do.

Adapters with random (non-zero) LoRA weights on the tiny model make every model answer differently; each printed
answer is checked against a reference: the folder loaded on its own with transformers/peft and ``generate``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import new_bucket, put_jsonl, sample_pairs

from langmerge.api.expert import Dataset
from langmerge.store import ObjectStore
from langmerge.tasks import TryLanguage, TryTask
from langmerge_trainer.data import load_eval_split
from langmerge_trainer.evaluate import peft_compat
from langmerge_trainer.tryout import EMPTY, run_try

LANGS = ("es", "it")
ROW = re.compile(r"^(?:\[\d+\] |    )(input|expected|base|expert|merged r\d+) +(.*)$")


def _random_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False
    )
    with peft_compat():
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)
    return out


def _reference(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = " ".join(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).split())
    return text or EMPTY


def _reference_loss(model: Any, tokenizer: Any, prompt: str, completion: str) -> float:
    """Mean cross-entropy on the completion's tokens and the end of sequence, after BOS + prompt."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = [*tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = [tokenizer.bos_token_id, *prompt_ids, *answer]
    labels = [-100] * (1 + len(prompt_ids)) + answer
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)


def _split_loss(text: str) -> tuple[str, float | None]:
    match = re.fullmatch(r"(.*)  \[loss (\d+\.\d\d)\]", text)
    return (match[1], float(match[2])) if match else (text, None)


def _blocks(text: str) -> dict[str, list[dict[str, str]]]:
    """language -> cases (label -> text) from the printed report."""
    blocks: dict[str, list[dict[str, str]]] = {}
    current: list[dict[str, str]] = []
    for line in text.splitlines():
        if line.startswith("== "):
            current = blocks.setdefault(line.split()[1], [])
            continue
        match = ROW.match(line)
        if match:
            if line.startswith("["):
                current.append({})
            current[-1][match[1]] = match[2]
    return blocks


@pytest.fixture(scope="module")
def world(s3: ObjectStore, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bucket = new_bucket(s3)
    tmp = tmp_path_factory.mktemp("try")
    s3.upload_dir(tiny_model_dir, f"s3://{bucket}/base")
    adapters = {}
    for seed, lang in enumerate(LANGS, start=1):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", [p.row() for p in sample_pairs(lang, 40)])
        folder = _random_adapter(tiny_model_dir, tmp / f"adapter-{lang}", seed)
        s3.upload_dir(folder, f"s3://{bucket}/adapters/{lang}")
        adapters[lang] = folder
    merged = _random_adapter(tiny_model_dir, tmp / "merged", 99)
    s3.upload_dir(merged, f"s3://{bucket}/merged/model")
    return {"bucket": bucket, "adapters": adapters, "merged": merged, "tmp": tmp}


def _task(bucket: str, langs: tuple[str, ...] = LANGS, **overrides: Any) -> TryTask:
    languages = [
        TryLanguage(
            language=lang,
            expert=f"dialog-{lang}",
            adapter_uri=f"s3://{bucket}/adapters/{lang}",
            dataset=Dataset(uri=f"s3://{bucket}/data/{lang}", evalFraction=0.3),
            figures={"expert": 2.0, "merged": 2.125},
        )
        for lang in langs
    ]
    fields: dict[str, Any] = {
        "kind": "MergedModel",
        "namespace": "ns",
        "name": "dialog-multilingual",
        "revision": 3,
        "method": "ties",
        "base_uri": f"s3://{bucket}/base",
        "merged_uri": f"s3://{bucket}/merged/model",
        "merged_format": "peft-adapter",
        "languages": languages,
        "examples": 2,
        "max_new_tokens": 6,
    }
    return TryTask.model_validate({**fields, **overrides})


def test_try_shows_what_each_model_answers(
    s3: ObjectStore, tiny_model_dir: Path, world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LANGMERGE_MODEL_CACHE", str(tmp_path / "cache"))  # empty: the first run downloads
    bucket = world["bucket"]
    task = _task(bucket)
    out, err = io.StringIO(), io.StringIO()
    assert run_try(task, s3, device=torch.device("cpu"), out=out, err=err) == 0
    report = out.getvalue()
    print(err.getvalue() + report)
    assert "MergedModel ns/dialog-multilingual, revision 3 (ties, peft-adapter)" in report
    assert "eval loss expert 2.000, merged 2.125" in report
    progress = err.getvalue()
    assert "base model: downloading" in progress
    assert "merged model (revision 3): downloading" in progress and "expert dialog-es (es): downloading" in progress

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    blocks = _blocks(report)
    assert sorted(blocks) == list(LANGS)
    differs = 0
    for lang in LANGS:
        examples = load_eval_split(s3, task.languages[LANGS.index(lang)].dataset, max_examples=2)  # type: ignore[arg-type]
        cases = blocks[lang]
        assert [c["input"] for c in cases] == [" ".join(e.prompt.split()) for e in examples]
        assert [c["expected"] for c in cases] == [" ".join(e.completion.split()) for e in examples]
        with peft_compat():
            expert = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(world["adapters"][lang])
            ).eval()
            merged = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(world["merged"])
            )
        for case, example in zip(cases, examples, strict=True):
            shown = {key: _split_loss(case[key]) for key in ("base", "expert", "merged r3")}
            for key, model in (("base", base), ("expert", expert), ("merged r3", merged.eval())):
                text, loss = shown[key]
                assert text == _reference(model, tokenizer, example.prompt, 6)
                reference = _reference_loss(model, tokenizer, example.prompt, example.completion)
                assert loss is not None and abs(loss - reference) <= 0.006, (key, loss, reference)
            differs += len({text for text, _loss in shown.values()}) > 1
    assert differs > 0, "the random adapters should change some answer"

    # A second run downloads nothing: the folders come from the model cache.
    again = io.StringIO()
    run_try(task, s3, device=torch.device("cpu"), out=io.StringIO(), err=again)
    assert "base model: cached" in again.getvalue() and "downloading" not in again.getvalue()


def test_try_full_weights_and_own_inputs(s3: ObjectStore, tiny_model_dir: Path, world: dict[str, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bucket = world["bucket"]
    full = world["tmp"] / "full"
    with peft_compat():
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(world["merged"]))
    merged.merge_and_unload().save_pretrained(full)
    s3.upload_dir(full, f"s3://{bucket}/full/model")
    task = _task(
        bucket,
        merged_uri=f"s3://{bucket}/full/model",
        merged_format="full-weights",
        inputs=["Hola, ¿cómo estás?", "Buongiorno"],
        show=["merged"],
        languages=[TryLanguage(language="it", expert="dialog-it")],
    )
    out = io.StringIO()
    run_try(task, s3, device=torch.device("cpu"), out=out, err=io.StringIO())
    blocks = _blocks(out.getvalue())
    assert list(blocks) == ["it"] and [c["input"] for c in blocks["it"]] == ["Hola, ¿cómo estás?", "Buongiorno"]
    reference = AutoModelForCausalLM.from_pretrained(full).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for case in blocks["it"]:
        assert set(case) == {"input", "merged r3"}, "own inputs: no expected answer, no loss"
        assert case["merged r3"] == _reference(reference, tokenizer, case["input"], 6)


LABELS = ["money", "science"]
#: Languages with both topics in the corpus.
TOPIC_LANGS = ("it", "ja")


def _random_classifier_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A sequence-classification adapter as the trainer saves one: LoRA on the encoder, the head trained fully
    (PEFT ``modules_to_save``); random weights."""
    from peft import LoraConfig, get_peft_model

    from langmerge_trainer.classify import load_classifier

    model = load_classifier(base_dir, LABELS, torch.device("cpu"), pad_token_id=None)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False
    )
    with peft_compat():
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, 1.0)
    peft_model.save_pretrained(out)
    return out


def test_try_shows_a_classifiers_labels_and_probabilities(
    s3: ObjectStore, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from peft import PeftModel

    from langmerge_trainer.bench.workloads import topic_data
    from langmerge_trainer.classify import load_classifier
    from langmerge_trainer.sample import build_tiny_bert

    tmp = tmp_path_factory.mktemp("try-classifier")
    data = {lang: topic_data(lang, LABELS).train[:30] for lang in TOPIC_LANGS}
    base_dir = build_tiny_bert(tmp / "bert", [r["text"] for rows in data.values() for r in rows])
    bucket = new_bucket(s3)
    s3.upload_dir(base_dir, f"s3://{bucket}/base")
    folders = {}
    for seed, lang in enumerate(TOPIC_LANGS, start=1):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", data[lang])
        folders[lang] = _random_classifier_adapter(base_dir, tmp / f"adapter-{lang}", seed)
        s3.upload_dir(folders[lang], f"s3://{bucket}/adapters/{lang}")
    folders["merged"] = _random_classifier_adapter(base_dir, tmp / "merged", 7)
    s3.upload_dir(folders["merged"], f"s3://{bucket}/merged/model")
    task = _task(bucket, TOPIC_LANGS, labels=LABELS, metric="accuracy")
    out = io.StringIO()
    run_try(task, s3, device=torch.device("cpu"), out=out, err=io.StringIO())
    report = out.getvalue()
    print(report)
    assert "sequence classification over money, science: predicted label (probability)" in report
    assert "accuracy expert 2.000, merged 2.125" in report  # the figures given, under the task's metric

    def predict(model: Any, text: str) -> str:
        encoded = AutoTokenizer.from_pretrained(base_dir)(text, truncation=True, max_length=1024, return_tensors="pt")
        with torch.no_grad():
            probabilities = torch.softmax(model(**encoded).logits[0].float(), dim=-1)
        return f"{LABELS[int(probabilities.argmax())]} ({float(probabilities.max()):.2f})"

    from transformers import AutoTokenizer

    base = load_classifier(base_dir, LABELS, torch.device("cpu"), pad_token_id=None).eval()
    blocks = _blocks(report)
    for lang in TOPIC_LANGS:
        examples = load_eval_split(s3, task.languages[TOPIC_LANGS.index(lang)].dataset, max_examples=2, labels=LABELS)  # type: ignore[arg-type]
        with peft_compat():
            expert = PeftModel.from_pretrained(
                load_classifier(base_dir, LABELS, torch.device("cpu"), pad_token_id=None), str(folders[lang])
            ).eval()
            merged = PeftModel.from_pretrained(
                load_classifier(base_dir, LABELS, torch.device("cpu"), pad_token_id=None), str(folders["merged"])
            ).eval()
        for case, example in zip(blocks[lang], examples, strict=True):
            assert case["expected"] == example.label
            assert case["base"] == predict(base, example.text)
            assert case["expert"] == predict(expert, example.text)
            assert case["merged r3"] == predict(merged, example.text)
            assert re.fullmatch(r"(money|science) \(\d\.\d\d\)", case["merged r3"])
