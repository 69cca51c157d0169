import argparse
import json

import numpy as np
import pytest
from conftest import run

from collab_ray.core.errors import ConfigError
from collab_ray.core.pipeline import Pipeline
from collab_ray.eval import cli as eval_cli
from collab_ray.eval.datasets import (
    convert,
    convert_arc,
    convert_sciq,
    convert_triviaqa,
    load,
    load_jsonl,
)
from collab_ray.eval.harness import CachedBackend, evaluate
from collab_ray.eval.metrics import (
    acc_norm_scores,
    accuracy,
    exact_match,
    normalize_answer,
    paired_comparison,
)

CHOICE = [
    {"id": "1", "question": "What do cats say?", "choices": ["meow", "moo"], "answer": 0},
    {"id": "2", "context": "Water boils at 100 degrees.", "question": "When does water boil?", "choices": ["at 10", "at 100"], "answer": 1},
    {"id": "3", "question": "Which is a color?", "choices": ["blue", "seven", "run"], "answer": 0},
]
SHORT = [{"id": "a", "question": "Capital of France?", "answers": ["Paris"]}, {"id": "b", "question": "2+2?", "answers": ["4", "four"]}]


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metrics():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("Paris.\nmore text", ["paris"]) and not exact_match("", ["paris"]) and not exact_match("Lyon", ["Paris"])
    assert acc_norm_scores([-4.0, -4.0], ["ab", "abcd"]) == [-2.0, -1.0]
    a = accuracy([True] * 58 + [False] * 42)
    assert a.value == 0.58 and a.low == pytest.approx(0.482, abs=1e-3) and a.high == pytest.approx(0.672, abs=1e-3)
    p = paired_comparison([True, True, True, False], [False, False, True, True])
    assert (p.a_only, p.b_only, p.diff) == (2, 1, 0.25) and p.p_value == 1.0
    assert paired_comparison([True] * 10, [False] * 10).p_value == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="3 and 2"):
        paired_comparison([True] * 3, [True] * 2)


def test_load_jsonl_and_errors(tmp_path):
    d = load_jsonl(write(tmp_path, CHOICE))
    assert d.kind == "choice" and len(d.items) == 3 and d.items[1].prompt == "Water boils at 100 degrees.\nQuestion: When does water boil?\nAnswer:"
    assert load_jsonl(write(tmp_path, SHORT, "s.jsonl")).kind == "short"
    bad = write(tmp_path, [{"question": "q", "choices": ["a", "b"], "answer": 5}], "bad.jsonl")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: 'answer' .* got 5"):
        load_jsonl(bad)
    with pytest.raises(ConfigError, match="mixes"):
        load_jsonl(write(tmp_path, CHOICE + SHORT, "mixed.jsonl"))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": true}', r"bad.jsonl:2: 'answer' .* got True"),
        ('[{"question": "q", "answers": ["a"]}]', r"bad.jsonl:2: a row must be a JSON object, got list"),
        ('{"question": "q"}', r"bad.jsonl:2: an item needs 'choices'"),
        ('{"choices": ["a", "b"], "answer": 0}', r"bad.jsonl:2: 'question' must be a non-empty string, got None"),
        ('{"prompt": "", "answers": ["a"]}', r"bad.jsonl:2: 'prompt' must be a non-empty string, got ''"),
        ('{"prompt": "p", "question": "q", "answers": ["a"]}', r"bad.jsonl:2: give 'prompt' .* or 'question'"),
        ('{"prompt": "p", "answers": [""]}', r"bad.jsonl:2: 'answers' must be .* got \[''\]"),
        ('{"id": "a", "prompt": "p", "answers": ["x"]}', r"bad.jsonl:2: id 'a' is used already at .*bad.jsonl:1"),
        ('{"id": [1], "prompt": "p", "answers": ["x"]}', r"bad.jsonl:2: 'id' must be .* got \[1\]"),
        ("{oops", r"bad.jsonl:2: not JSON"),
    ],
)
def test_bad_rows_name_the_line_and_value(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "prompt": "A1+2=", "answers": ["3"]}\n' + line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_jsonl(path)


def test_raw_prompt_rows_and_limits(tmp_path):
    d = load_jsonl(write(tmp_path, [{"id": "x", "prompt": "A1+2=", "answers": ["3"]}, {"prompt": "Rab=", "answers": ["ba"]}]))
    assert d.kind == "short" and [i.prompt for i in d.items] == ["A1+2=", "Rab="] and [i.id for i in d.items] == ["x", "2"]
    assert d.items[0].gold == ["3"] and len(d.head(1).items) == 1 and d.head(5).items == d.items
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=f"--limit .* got {bad}"):
            d.head(bad)


def test_multitask_splits_are_datasets():
    mixed = load("multitask-hard:test")
    assert mixed.kind == "short" and len(mixed.items) == 3 * 256 and len({i.id for i in mixed.items}) == 3 * 256
    assert [i.id for i in mixed.items[:4]] == ["add-0", "reverse-0", "sort-0", "add-1"]  # interleaved: any head is balanced
    add = load("multitask-hard:validation:add")
    assert len(add.items) == 256 and add.items[0].prompt.startswith("A") and add.items[0].prompt.endswith("=")
    assert not {i.prompt for i in add.items} & {i.prompt for i in mixed.items}  # validation and test are disjoint
    with pytest.raises(ConfigError, match="'multitask-hard:train': unknown split 'train'"):
        load("multitask-hard:train")
    with pytest.raises(ConfigError, match=r"'no-such-set' is neither .* arc_easy, .* multitask-hard:test"):
        load("no-such-set")


def test_converters_on_hand_made_rows():
    arc = convert_arc({"id": "x", "question": "q", "choices": {"label": ["A", "B", "C"], "text": ["a", "b", "c"]}, "answerKey": "B"})
    assert arc == {"id": "x", "question": "q", "choices": ["a", "b", "c"], "answer": 1}
    sciq = convert_sciq({"question": "q", "support": "s", "distractor1": "d1", "distractor2": "d2", "distractor3": "d3", "correct_answer": "ok"}, 7)
    assert sciq["choices"][sciq["answer"]] == "ok" and sorted(sciq["choices"]) == ["d1", "d2", "d3", "ok"] and sciq["context"] == "s"
    tqa = convert_triviaqa({"question_id": "t", "question": "q", "answer": {"value": "Paris", "aliases": ["Paris", "City of Light"], "normalized_aliases": ["paris"]}})
    assert tqa["answers"] == ["Paris", "City of Light", "paris"]
    with pytest.raises(ConfigError, match="'mmlu'"):
        convert("mmlu")


@pytest.mark.real
def test_convert_real_benchmarks(tmp_path):
    sizes = {"arc_easy": 570, "sciq": 1000}
    for name, n in sizes.items():
        d = load_jsonl(convert(name, tmp_path))
        assert len(d.items) == n and d.kind == "choice"
    assert load_jsonl(convert("triviaqa", tmp_path)).kind == "short"


def test_cached_backend_reuses_results(backends):
    b = backends(a="tiny:llama-bpe")["a"]
    cached = CachedBackend(b)
    first = run(cached.loglikelihood([("The cat", " sat"), ("The dog", " ran")]))
    again = run(cached.loglikelihood([("The dog", " ran"), ("The cat", " sat")]))
    assert again == first[::-1] and len(cached._ll) == 2


def test_evaluate_choice_and_short_answer(backends, tmp_path):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp")
    pipelines = {
        "a": Pipeline("single", {"a": models["a"]}),
        "b": Pipeline("single", {"b": models["b"]}),
        "fuse": Pipeline("fuse", models),
        "vote": Pipeline("vote", models),
        "rank": Pipeline("rank", models),
        "cascade": Pipeline("cascade", models, {"thresholds": [0.99]}),
    }
    done = run(evaluate(pipelines, load_jsonl(write(tmp_path, CHOICE))))
    scores, runs = done.scores, done.runs
    assert set(scores) == set(pipelines) and set(runs) == {"tiny:llama-bpe", "tiny:llama-sp"}
    for name in ("a", "b"):  # a single pipeline agrees with its model's batched pass
        assert scores[name].correct == runs[f"tiny:llama-{'bpe' if name == 'a' else 'sp'}"].correct.tolist()
        assert scores[name].calls == 3
    assert scores["fuse"].calls == 6 and all(d["stage"] in (0, 1) for d in scores["cascade"].decisions)
    best = done.best_single()
    assert best in runs and all(runs[best].correct.mean() >= r.correct.mean() for r in runs.values())
    own = {"tiny:llama-bpe": "a", "tiny:llama-sp": "b"}[best]
    assert done.paired()[own].diff == 0 and done.paired()[own].p_value == 1.0  # the best model's own pipeline
    records = done.records()
    assert [r["id"] for r in records] == ["1", "2", "3"] and [r["gold"] for r in records] == [0, 1, 0]
    assert all(r["pipelines"]["fuse"]["correct"] == (r["pipelines"]["fuse"]["answer"] == r["gold"]) for r in records)
    short = run(evaluate({"a": pipelines["a"], "fuse": pipelines["fuse"]}, load_jsonl(write(tmp_path, SHORT, "s.jsonl")))).scores
    assert len(short["fuse"].correct) == 2 and short["fuse"].calls > 2
    seen = []
    with pytest.raises(ConfigError, match="pipeline 'moa': strategy 'moa' only generates"):
        run(evaluate({"a": pipelines["a"], "moa": Pipeline("moa", models)}, load_jsonl(write(tmp_path, CHOICE)), on_update=seen.append))
    assert seen == []  # refused before any model ran


def test_eval_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    data = write(tmp_path, CHOICE)
    args = parser.parse_args(
        ["eval", "--dataset", str(data), "--model", "tiny:llama-bpe", "--model", "tiny:llama-sp", "--pipeline", 'fuse:{"weights": [2, 1]}', "--output", str(tmp_path / "out" / "r")]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "fuse" in out and "tiny:llama-sp" in out
    saved = json.loads((tmp_path / "out" / "r.json").read_text())
    assert saved["items"] == 3 and set(saved["pipelines"]) == {"tiny:llama-bpe", "tiny:llama-sp", "fuse"}
    assert (tmp_path / "out" / "r.svg").read_text().startswith("<svg")
    with pytest.raises(ConfigError, match="not JSON"):
        eval_cli.plan_from_args([], ["fuse:{oops"], "choice")


def test_eval_cli_scores_pipelines_of_a_config(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    data = write(tmp_path, CHOICE)
    args = parser.parse_args(["eval", "deploy/tiny.yaml", "--pipelines", "target,draft,fuse,cascade", "--dataset", str(data), "--output", str(tmp_path / "r")])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["pipelines"]) == ["target", "draft", "fuse", "cascade"]
    assert all(len(p["correct"]) == 3 for p in saved["pipelines"].values())
    with pytest.raises(ConfigError, match="'nope' not in deploy/tiny.yaml"):
        eval_cli.plan_from_config("deploy/tiny.yaml", ["fuse", "nope"], "choice")
    for bad in (["eval", "deploy/tiny.yaml", "--model", "tiny:llama-bpe", "--dataset", str(data)], ["eval", "--pipelines", "fuse", "--model", "tiny:llama-bpe", "--dataset", str(data)]):
        with pytest.raises(ConfigError):
            args = parser.parse_args(bad)
            args.func(args)


def eval_parser():
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    return parser


def run_cli(argv):
    args = eval_parser().parse_args(argv)
    return args.func(args)


def test_eval_cli_output_records_paired_tests_and_progress(tmp_path, capsys):
    data = write(tmp_path, CHOICE)
    assert run_cli(["eval", "--dataset", str(data), "--model", "tiny:llama-bpe", "--model", "tiny:llama-sp", "--pipeline", "vote", "--output", str(tmp_path / "run.v2")]) == 0
    out, err = capsys.readouterr()
    assert "vs best single tiny:llama-" in out and "[p=" in out
    assert "model tiny:llama-bpe: 100%" in err and "pipeline vote: 100%" in err and "item/s" in err  # tqdm bars
    saved = json.loads((tmp_path / "run.v2.json").read_text())  # the name kept as given
    assert (tmp_path / "run.v2.svg").is_file() and not (tmp_path / "run.json").exists()
    assert saved["complete"] and saved["best_single"] in ("tiny:llama-bpe", "tiny:llama-sp") and set(saved["models"]) == {"tiny:llama-bpe", "tiny:llama-sp"}
    assert [r["id"] for r in saved["records"]] == ["1", "2", "3"] and saved["records"][1]["gold"] == 1
    assert set(saved["records"][0]["pipelines"]) == {"tiny:llama-bpe", "tiny:llama-sp", "vote"}
    assert set(saved["paired_vs_best_single"]["vote"]) == {"diff", "a_only", "b_only", "p_value"}


def test_eval_cli_checks_every_input_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_cli, "load_pipelines", lambda plan: pytest.fail("a model was loaded"))
    data = write(tmp_path, CHOICE)
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(data.read_text() + '{"question": "q", "choices": ["a", "b"], "answer": true}\n')
    cases = [
        (["--dataset", str(data), "--limit", "0"], "--limit .* got 0"),
        (["--dataset", str(data), "--limit", "-1"], "--limit .* got -1"),
        (["--dataset", str(bad_row)], r"bad.jsonl:4: 'answer' .* got True"),
        (["--dataset", "arc_eazy"], "'arc_eazy' is neither .* arc_easy"),
        (["--dataset", str(data), "--pipelines", "fuse,speculative"], "pipeline 'speculative': strategy 'speculative' only generates; it cannot answer multiple-choice items"),
        (["--dataset", str(data), "--pipelines", "fuse", "--output", str(tmp_path) + "/"], "names a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_cli(["eval", "deploy/tiny.yaml", *argv])
    two = ["--model", "tiny:llama-bpe", "--model", "tiny:llama-sp"]
    with pytest.raises(ConfigError, match="pipeline 'moa': strategy 'moa' only generates"):
        run_cli(["eval", "--dataset", str(data), *two, "--pipeline", "moa"])
    with pytest.raises(ConfigError, match="--pipeline moa: strategy 'moa' needs at least 2 models, got 1"):
        run_cli(["eval", "--dataset", str(data), "--model", "tiny:llama-bpe", "--pipeline", "moa"])
    with pytest.raises(ConfigError, match=r"--pipeline fuse:\{\"mode\": \"blend\"\}: mode: Input should be .*, got 'blend'"):
        run_cli(["eval", "--dataset", str(data), *two, "--pipeline", 'fuse:{"mode": "blend"}'])


def test_eval_cli_without_pipelines_runs_those_that_can_answer(tmp_path):
    plan = eval_cli.plan_from_config("deploy/tiny.yaml", [], "choice")
    assert {"fuse", "vote", "rank", "cascade", "target", "sp"} <= set(plan.pipelines)
    assert {"speculative", "moa", "contrastive"} <= set(plan.skipped) and "only generates" in plan.skipped["moa"]
    assert "cannot answer multiple-choice" in plan.skipped["speculative"] and not set(plan.pipelines) & set(plan.skipped)
    assert set(plan.models) == {m for _, roles in plan.pipelines.values() for m in roles.values()}
    every = eval_cli.plan_from_config("deploy/tiny.yaml", [], "short")
    assert not every.skipped and "speculative" in every.pipelines


def test_eval_cli_keeps_passes_done_before_a_failure(tmp_path, monkeypatch, capsys):
    from collab_ray.eval import harness

    score = harness.score_pipeline

    async def failing(name, *args, **kwargs):
        if name == "fuse":
            raise RuntimeError("out of memory")
        return await score(name, *args, **kwargs)

    monkeypatch.setattr(harness, "score_pipeline", failing)
    with pytest.raises(RuntimeError):
        run_cli(["eval", "deploy/tiny.yaml", "--pipelines", "draft,fuse", "--dataset", str(write(tmp_path, CHOICE)), "--output", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())  # a trailing .json is not doubled
    assert not saved["complete"] and set(saved["models"]) == {"target", "draft"} and list(saved["pipelines"]) == ["draft"]
    assert "complete: false" in capsys.readouterr().err


def test_eval_cli_scores_raw_prompt_short_answers_of_the_multitask_splits(tmp_path, capsys):
    out = tmp_path / "mt"
    assert run_cli(["eval", "--dataset", "multitask-small:test", "--limit", "6", "--model", "multitask-small:base", "--model", "multitask-small:add", "--pipeline", "cascade:{\"thresholds\": [-0.5]}", "--output", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["kind"] == "short" and saved["items"] == 6
    assert [r["id"] for r in saved["records"][:3]] == ["add-0", "reverse-0", "sort-0"] and saved["records"][0]["gold"] == ["672"]
    assert all(isinstance(r["pipelines"]["cascade"]["answer"], str) for r in saved["records"])


def test_model_pass_scores_long_choices_in_bounded_chunks(tiny, tmp_path, monkeypatch):
    """Each log-likelihood call of a model pass holds at most SCORE_BUDGET_BYTES of logits (an item over it alone)."""
    from collab_ray.eval import harness

    rows = [{"id": str(i), "question": f"Question {i}?", "choices": ["a " * (3 + 5 * (i % 3)), "b " * 4], "answer": 0} for i in range(7)]
    dataset = load_jsonl(write(tmp_path, rows))
    whole = run(harness.run_model(tiny, dataset))
    vocab = run(tiny.info()).vocab_size
    monkeypatch.setattr(harness, "SCORE_BUDGET_BYTES", 4 * vocab * 20)  # 20 continuation tokens per call
    chunks = run(harness.choice_chunks(tiny, dataset.items, batch=16))
    assert [it for c in chunks for it in c] == dataset.items and len(chunks) > 2
    sizes = [sum(len(run(tiny.encode(" " + ch, add_special_tokens=False))) for it in c for ch in it.choices) for c in chunks]
    assert all(s <= 20 or len(c) == 1 for s, c in zip(sizes, chunks))
    calls = []
    inner = tiny.loglikelihood
    monkeypatch.setattr(tiny, "loglikelihood", lambda requests: calls.append(len(requests)) or inner(requests))
    bounded = run(harness.run_model(tiny, dataset))
    assert calls == [2 * len(c) for c in chunks]  # one call per chunk; each item scored once
    assert bounded.correct.tolist() == whole.correct.tolist() and np.allclose(bounded.score, whole.score)


def test_a_strategy_whose_parameters_cannot_choose_is_refused_before_models_run(tiny, tmp_path):
    from collab_ray.eval.harness import cannot_answer

    class OnlyScoresGenerations(type(Pipeline("vote", {"a": tiny}).strategy)):
        choice_refusal = "vote with a learned scorer scores generated answers; it cannot answer multiple-choice items"

    strategy = OnlyScoresGenerations()
    assert cannot_answer(strategy, "choice") == strategy.choice_refusal and cannot_answer(strategy, "short") is None
    assert cannot_answer(Pipeline("cascade", {"a": tiny}, {"thresholds": []}).strategy, "choice") is None
    seen = []
    with pytest.raises(ConfigError, match="pipeline 'v': vote with a learned scorer"):
        run(evaluate({"v": Pipeline(strategy, {"a": tiny})}, load_jsonl(write(tmp_path, CHOICE)), on_update=seen.append))
    assert seen == []


def test_eval_json_takes_numpy_values_of_decision_meta(tmp_path):
    from collab_ray.eval.harness import Evaluation, ModelRun, PipelineScore

    dataset = load_jsonl(write(tmp_path, CHOICE))
    done = Evaluation(dataset, {"m": ModelRun(np.array([True, False, True]), np.zeros(3), np.zeros(3), 0.1)})
    decisions = [{"choice": 0, "confidence": np.float32(0.9), "probs": np.array([0.9, 0.1])}] * 3
    done.scores["p"] = PipelineScore("p", [True, False, True], accuracy([True, False, True]), 3, 9, 0.1, decisions)
    eval_cli.write_json(done, tmp_path / "r.json", complete=True)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["pipelines"]["p"]["decisions"][0]["probs"] == [0.9, 0.1] and saved["paired_vs_best_single"]["p"]["p_value"] == 1.0
    assert saved["records"][2] == {"id": "3", "gold": 0, "pipelines": {"p": {"answer": 0, "correct": True}}}
