"""The continuous-batching engine: concurrent work gives exactly what one-by-one work gives, chunked
prefill equals one-shot prefill, the KV budget and leases hold, and a short request overtakes a long one."""

import asyncio
import time

import numpy as np
import pytest
import torch
from conftest import local_backend, run

from collab_ray.core import SamplingParams
from collab_ray.core.errors import ModelAtCapacity
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request
from collab_ray.models.backend import TransformersBackend
from collab_ray.models.work import Feed, Seq, pack

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [
    "The river", "A small boat drifts near the shore while", "Two plus two is four. Three plus five",
    "In the morning the baker", "The old mill stands", "Under the stone bridge the water",
    "She opened the door and", "Once upon a time",
]
LONG = " ".join(["the water runs past the old mill and under the stone bridge"] * 30)

PIPELINES = {  # name: (strategy, {role: source}, params) over the models of tiny.yaml
    "target": ("single", {"m": "tiny:llama-bpe"}, {}),
    "speculative": ("speculative", {"draft": "tiny:llama-bpe-small", "target": "tiny:llama-bpe"}, {"k": 4}),
    "fuse": ("fuse", {"a": "tiny:llama-bpe", "b": "tiny:llama-bpe-small"}, {}),
    "contrastive": ("contrastive", {"expert": "tiny:llama-bpe", "amateur": "tiny:llama-bpe-small"}, {}),
    "proxy": ("proxy", {"base": "tiny:llama-bpe", "expert": "tiny:llama-bpe", "antiexpert": "tiny:llama-bpe-small"}, {"alpha": 0.5}),
}


def pipeline(backends, name):
    strategy, roles, params = PIPELINES[name]
    return Pipeline(strategy, backends(**roles), params)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_32_concurrent_mixed_requests_equal_one_by_one(backends, stream):
    names = list(PIPELINES)
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(32)]
    pipes = {name: pipeline(backends, name) for name in names}

    async def one(name, prompt):
        chunks = []

        async def emit(text):
            chunks.append(text)

        result = await pipes[name].run(Request(prompt=prompt, params=GREEDY), emit if stream else None)
        if stream:
            assert "".join(chunks) == result.text
        return result.token_ids

    async def together():
        return await asyncio.gather(*(one(name, prompt) for name, prompt in jobs))

    async def one_by_one():
        return [await one(name, prompt) for name, prompt in jobs]

    alone = run(one_by_one())
    assert run(together()) == alone
    assert all(len(ids) == GREEDY.max_tokens for ids in alone)


@pytest.mark.parametrize("length", [40, 150, 300])
def test_chunked_prefill_equals_one_shot_prefill(length):
    chunked = TransformersBackend("tiny:llama-bpe", max_step_tokens=64)
    whole = local_backend("tiny:llama-bpe")
    try:
        ids = run(whole.encode(LONG))[:length]
        assert len(ids) == length
        a, b = run(chunked.open_session(ids)), run(whole.open_session(ids))
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
        with torch.no_grad():
            ref = torch.log_softmax(whole.model(torch.tensor([ids])).logits[0, -1].float(), -1).numpy()
        np.testing.assert_allclose(a.logprobs, ref, atol=1e-4)
        # appending a long chunk with every position, chunked by the step budget
        more = ids[:100]
        rows_a = run(chunked.append(a.session_id, more, all_positions=True))
        rows_b = run(whole.append(b.session_id, more, all_positions=True))
        np.testing.assert_allclose(rows_a, rows_b, atol=1e-4)
        run(whole.close_session(b.session_id))
        # generation and scoring behind a chunked prefill
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        assert run(chunked.generate([ids], params))[0].token_ids == run(whole.generate([ids], params))[0].token_ids
        (sa,), (sb,) = run(chunked.loglikelihood([(ids, ids[:5])])), run(whole.loglikelihood([(ids, ids[:5])]))
        assert sa.logprob == pytest.approx(sb.logprob, abs=1e-3)
    finally:
        chunked.shutdown()


def test_pack_keeps_padding_within_twice_the_real_tokens():
    feeds = [Feed(Seq(), [1] * n, [n - 1]) for n in (1, 1, 1, 5, 1, 64, 60, 2)]
    groups = pack(feeds)
    assert sorted(len(f.ids) for g in groups for f in g) == sorted(len(f.ids) for f in feeds)
    for g in groups:
        assert len(g) * max(len(f.ids) for f in g) <= 2 * sum(len(f.ids) for f in g) + 8


def test_short_request_overtakes_a_long_one():
    backend = TransformersBackend("tiny:llama-bpe", max_step_tokens=64)
    try:
        long_prompts = [run(backend.encode(LONG))[:400]] * 8
        done = {}

        async def timed(name, prompts, max_tokens):
            await backend.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            done[name] = time.monotonic()

        async def scenario():
            long = asyncio.ensure_future(timed("long", long_prompts, 64))
            await asyncio.sleep(0.05)  # the long request is in the engine first
            await asyncio.gather(long, timed("short", ["The river"], 8))

        run(scenario())
        assert done["short"] < done["long"]
    finally:
        backend.shutdown()


def test_the_generate_calls_of_one_request_are_one_fairness_group(tiny):
    """128 single-row calls of one request (prompts × n) take one slot-share of a step beside an
    8-token request, which then gets a row in every step (as separate groups it would wait for
    all 128 to be served between its tokens: 4 steps per token at 32 rows a step)."""
    big = SamplingParams(temperature=0.7, max_tokens=48, ignore_eos=True)

    async def scenario():
        calls = [([p], big.model_copy(update={"seed": i})) for i, p in enumerate(PROMPTS * 16)]
        request = asyncio.ensure_future(tiny.generate_batch(calls))
        while tiny.stats(fresh=True)["running"] < len(calls):
            await asyncio.sleep(0.01)
        before = tiny.stats(fresh=True)["steps"]
        await tiny.generate(["The river"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        steps = tiny.stats(fresh=True)["steps"] - before
        results = await request
        return steps, results

    steps, results = run(scenario())
    assert all(len(r) == 1 and r[0].usage.completion_tokens == 48 for r in results)
    assert steps <= 12, steps


def test_kv_budget_gives_a_clear_capacity_error_and_keeps_serving():
    backend = TransformersBackend("tiny:llama-bpe", kv_budget_tokens=256, queue_timeout_s=0.05, name="small-kv")
    try:
        ids = run(backend.encode(LONG))
        with pytest.raises(ModelAtCapacity, match=r"'small-kv'.*300 tokens.*budget of 256"):
            run(backend.open_session(ids[:300]))  # can never fit: refused before any model work

        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

        async def full():
            holder = asyncio.ensure_future(backend.generate([ids[:20]], params))  # holds 220 tokens
            await asyncio.sleep(0)
            with pytest.raises(ModelAtCapacity, match=r"'small-kv' is at capacity.*in use \d+ of 256"):
                await backend.generate([ids[:20]], params)
            return await holder

        (gen,) = run(full())
        assert len(gen.token_ids) == 200
        assert backend.stats(fresh=True)["rejected"] == 1
        (again,) = run(backend.generate(["The river"], SamplingParams(temperature=0, max_tokens=4)))
        assert len(again.token_ids) == 4

        # idle sessions make room for new work (and replay covers them)
        s = run(backend.open_session(ids[:200]))
        (gen,) = run(backend.generate([ids[:20]], SamplingParams(temperature=0, max_tokens=100)))
        assert backend.stats(fresh=True)["evicted"] >= 1
        assert s.session_id not in backend.engine.sessions
    finally:
        backend.shutdown()


def test_expired_leases_are_swept_with_no_call_arriving():
    backend = TransformersBackend("tiny:llama-bpe", session_ttl_s=0.4)
    try:
        ids = run(backend.encode("The river"))
        async def open_three():  # together: opened one by one on a loaded machine, the first expired before the third
            return await asyncio.gather(*(backend.open_session(ids) for _ in range(3)))

        run(open_three())
        assert backend.stats(fresh=True)["sessions_open"] == 3
        time.sleep(1.0)
        stats = backend.stats()  # the snapshot the loop published on its own
        assert stats["sessions_open"] == 0 and stats["expired"] == 3 and stats["kv_tokens"] == 0
    finally:
        backend.shutdown()


def test_cancelled_requests_free_their_sessions(tiny):
    before = tiny.stats(fresh=True)["sessions_open"]
    draft_before = local_backend("tiny:llama-bpe-small").stats(fresh=True)["sessions_open"]
    pipe = pipeline(lambda **roles: {r: local_backend(s) for r, s in roles.items()}, "speculative")
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def scenario():
        tasks = [asyncio.ensure_future(pipe.run(Request(prompt=p, params=params))) for p in PROMPTS]
        for _ in range(200):
            await asyncio.sleep(0.05)
            if tiny.stats(fresh=True)["sessions_open"] >= before + len(PROMPTS):
                break
        assert tiny.stats(fresh=True)["sessions_open"] >= before + len(PROMPTS)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.1)

    run(scenario())
    assert tiny.stats(fresh=True)["sessions_open"] == before
    assert local_backend("tiny:llama-bpe-small").stats(fresh=True)["sessions_open"] == draft_before


def test_limits_are_checked_before_any_model_work():
    backend = TransformersBackend("tiny:llama-bpe", max_prompt_tokens=32, max_items_per_call=4)
    try:
        steps = backend.stats(fresh=True)["steps"]
        with pytest.raises(ValueError, match="prompt 1 has 40 tokens, over this server's max_prompt_tokens of 32"):
            run(backend.generate([[5] * 3, [5] * 40], GREEDY))
        with pytest.raises(ValueError, match=r"generate: 5 items, outside \[1, 4\]"):
            run(backend.generate(["a"] * 5, GREEDY))
        s = run(backend.open_session([5] * 30))
        with pytest.raises(ValueError, match="would hold 34 tokens, over the limit of 32"):
            run(backend.propose(s.session_id, 4, GREEDY))
        assert backend.stats(fresh=True)["steps"] == steps + 1  # only the session's prefill ran
    finally:
        backend.shutdown()


def test_a_rollback_sent_with_the_next_call_equals_one_sent_on_its_own(backends):
    """`Session.rollback`/`sync` travel with the next append or propose (`keep`, `feed`): the
    results equal those of a session opened fresh on the same tokens, in-process and over Serve."""
    from collab_ray.core.session import Session

    (b,) = backends(m="tiny:llama-bpe").values()
    params = SamplingParams(temperature=0, max_tokens=8)

    async def scenario():
        ids = await b.encode("The river runs past the mill")
        s = await Session.open(b, ids)
        drafts = (await s.propose(4, params, top_k=1)).tokens
        kept = ids + drafts[:2] + [7]
        await s.sync(kept)  # two drafts rolled back, one token added: no call yet
        again = (await s.propose(3, params, top_k=1)).tokens
        await s.rollback(len(ids) + 1)
        rows = await s.append([9, 10], all_positions=True)
        await s.sync(ids + [11, 12])
        after_feed = await s.append([13], all_positions=True)
        await s.close()
        refs = []
        for prefix, op in ((kept, "propose"), (ids + drafts[:1], "append"), (ids + [11, 12], "append1")):
            fresh = await Session.open(b, prefix)
            if op == "propose":
                refs.append((await fresh.propose(3, params, top_k=1)).tokens)
            else:
                refs.append(await fresh.append([9, 10] if op == "append" else [13], all_positions=True))
            await fresh.close()
        return again, rows, after_feed, refs

    again, rows, after_feed, (ref_again, ref_rows, ref_after_feed) = run(scenario())
    assert again == ref_again
    assert np.asarray(rows).shape == np.asarray(ref_rows).shape == (2, np.asarray(rows).shape[1])
    np.testing.assert_allclose(rows, ref_rows, atol=1e-4)
    np.testing.assert_allclose(after_feed, ref_after_feed, atol=1e-4)
