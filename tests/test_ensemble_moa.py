from conftest import run

from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request
from collab_ray.ensemble.moa import aggregate_prompt


def test_aggregate_prompt_lists_every_response():
    text = aggregate_prompt("Why?", [" because A ", "because B"])
    assert "Question: Why?" in text and "Response 1: because A\nResponse 2: because B" in text


def test_moa_layers_call_proposers_then_the_aggregator(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp", agg="tiny:llama-bpe-small")
    params = SamplingParams(max_tokens=5, temperature=0.0)
    out = run(Pipeline("moa", models, {"layers": 2}).run(Request(messages=[{"role": "user", "content": "Hi"}], params=params)))
    calls = {m: s["calls"] for m, s in out.meta["models"].items()}
    assert calls == {"a": 2, "b": 2, "agg": 1}
    assert out.meta["output_model"] == "agg" and len(out.meta["collab"]["proposals"]) == 2
