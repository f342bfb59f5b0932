"""``langmerge bench`` checks every option before anything trains: each case here used to train for many minutes and
then fail (or, worse, run with a silent surprise). Now each is refused, or settled, in well under a second of work."""

from __future__ import annotations

from pathlib import Path

import pytest

from langmerge_trainer.bench.cli import build_parser, main, options_from_args
from langmerge_trainer.bench.errors import BenchError
from langmerge_trainer.bench.runner import object_name


def _options(tmp_path: Path, *argv: str):  # type: ignore[no-untyped-def]
    args = [*argv, "--output", str(tmp_path / "out")]
    return options_from_args(build_parser().parse_args(args), args)


def test_a_language_tag_with_capitals_gives_valid_object_names(tmp_path: Path) -> None:
    # was: every run trained, then the first merge failed on 'topic-zh-Hant-s3' (not a valid object name)
    opts = _options(tmp_path, "--workloads", "topic", "--languages", "en,zh-Hant", "--new-language", "none")
    topic = opts.built["topic"]
    assert topic.languages == ["en", "zh-Hant"] and topic.labels
    assert object_name("topic", "zh-Hant", "s3") == "topic-zh-hant-s3"


def test_topics_every_language_has_are_chosen_and_the_report_says_which_were_left_out(tmp_path: Path) -> None:
    # nl has no psychology file: it used to be accepted silently and trained with no psychology example
    opts = _options(tmp_path, "--workloads", "topic", "--languages", "en,zh-Hant", "--new-language", "nl")
    topic = opts.built["topic"]
    assert topic.labels is not None and "psychology" not in topic.labels and len(topic.labels) == 5
    assert topic.labels_note is not None and "psychology, which nl lack(s)" in topic.labels_note
    for data in topic.data.values():
        assert {r["label"] for r in data.train} == set(topic.labels)


def test_languages_without_two_shared_topics_are_refused_naming_each_languages_topics(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as err:
        _options(tmp_path, "--workloads", "topic", "--languages", "th,tr,uk", "--new-language", "ru")
    text = str(err.value)
    assert (
        "share 0 of the default topics" in text and "th: greetings" in text and "ru: conversations, food, money" in text
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as err:
        _options(tmp_path, "--languages", "en,xx", "--seeds", "1,1", "--update-share", "2", "--epochs", "0")
    text = str(err.value)
    for part in ("xx not in the corpus", "--seeds must be distinct", "--update-share must be in", "--epochs must be"):
        assert part in text


def test_topics_asked_for_must_be_in_every_language(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="nl lacks psychology"):
        _options(
            tmp_path,
            "--workloads",
            "topic",
            "--languages",
            "it,nl",
            "--new-language",
            "none",
            "--topics",
            "money,psychology",
        )
    opts = _options(
        tmp_path, "--workloads", "topic", "--languages", "it,nl", "--new-language", "none", "--topics", "money,science"
    )
    assert opts.built["topic"].labels == ["money", "science"]


def test_the_updated_and_new_languages_are_checked(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="the updated language ko is not one of it,ja"):
        _options(tmp_path, "--workloads", "topic", "--languages", "it,ja", "--updated-language", "ko")
    with pytest.raises(BenchError, match="given twice"):
        _options(tmp_path, "--workloads", "topic", "--languages", "it,ja", "--new-language", "ja")
    with pytest.raises(BenchError, match="at least two languages"):
        _options(tmp_path, "--workloads", "dialog", "--dialog-languages", "es")


def test_the_update_is_the_size_the_report_says(tmp_path: Path) -> None:
    # was +34% to +41% for "+25%": the share was taken after the per-language cap
    opts = _options(tmp_path, "--workloads", "topic,dialog")
    for w in opts.built.values():
        up = w.data[w.updated_language]
        assert len(up.update) == round(0.25 * len(up.train)) and up.update
        others = [lang for lang in w.all_languages if lang != w.updated_language]
        assert all(not w.data[lang].update for lang in others)
        assert not {r.get("text") or r["prompt"] for r in up.update} & {r.get("text") or r["prompt"] for r in up.test}
    opts = _options(tmp_path, "--workloads", "topic", "--update-share", "0.5")
    up = opts.built["topic"].data["it"]
    assert len(up.update) == round(0.5 * len(up.train))


def test_the_cli_prints_the_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--languages", "th,tr,uk", "--new-language", "ru", "--output", str(tmp_path)]) == 1
    assert "langmerge bench: topic: th, tr, uk, ru share 0 of the default topics" in capsys.readouterr().err


def test_the_trunk_recipe_splits_the_joint_models_epochs_by_default(tmp_path: Path) -> None:
    # trunk (all but one epoch over every language) + branches (the last epoch each): the joint model's tokens
    opts = _options(tmp_path, "--workloads", "topic,dialog")
    for name in ("topic", "dialog"):
        w = opts.built[name]
        assert w.recipe == "trunk" and w.trunk_epochs == opts.epochs[name] - 1 and w.branch_epochs == 1
        assert w.trunk_epochs + w.branch_epochs == opts.epochs[name]
    assert _options(tmp_path, "--workloads", "topic", "--branch-epochs", "3").built["topic"].branch_epochs == 3
    two = _options(tmp_path, "--workloads", "topic", "--trunk-epochs", "2").built["topic"]
    assert (two.trunk_epochs, two.branch_epochs) == (2, 2)
    quick = _options(tmp_path, "--workloads", "topic", "--quick").built["topic"]
    assert (quick.trunk_epochs, quick.branch_epochs) == (1, 1)
