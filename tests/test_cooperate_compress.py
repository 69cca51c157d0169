"""`compress`: surprisal-based prompt pruning hits its ratio on short and long (windowed) prompts."""

import random

import numpy as np
import pytest
import torch

from collab_ray.core import SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request
from collab_ray.cooperate.compress import compress_text, select_tokens
from collab_ray.core.session import token_surprisal
from collab_ray.models.tiny import corpus
from conftest import local_backend, run

INSTRUCTION = "Answer the question from the notes below."
QUESTION = "Question: what does the baker do in the morning?"


def long_prompt(backend, tokens: int) -> str:
    """Instruction, then notes (corpus lines, one paragraph each) of about `tokens` tokens, then a question."""
    rng, lines, notes, count = random.Random(tokens), corpus().splitlines(), [], 0
    sizes = {line: len(run(backend.encode(line, add_special_tokens=False))) for line in lines if line}
    while count < tokens:
        line = rng.choice(list(sizes))
        notes.append(line)
        count += sizes[line]
    return "\n\n".join([INSTRUCTION, *notes, QUESTION])


def test_select_tokens_keeps_fixed_segments_and_the_most_surprising():
    surprisal = np.array([1.0, 2.0, 9.0, 1.0, 8.0, 0.5, 7.0, 3.0])
    mask = select_tokens(surprisal, [(0, 2, True), (2, 5, False), (5, 8, False)], keep=4)
    assert mask.tolist() == [True, True, True, False, False, False, True, False]


@pytest.mark.parametrize("tokens", [200, 2_000, 8_000])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_compression_hits_its_ratio(backends, tokens, ratio):
    compressor = backends(compressor="tiny:llama-bpe-small")["compressor"]
    text = long_prompt(compressor, tokens)
    c = run(compress_text(compressor, text, ratio, keep_first=1, keep_last=1, window=512))
    assert c.original_tokens >= tokens  # 8 000 tokens: 16 windows of the 512-token context
    assert abs(c.ratio - ratio) <= 0.1 * ratio, c.ratio
    assert c.text.startswith(INSTRUCTION) and c.text.endswith(QUESTION)


def test_strategy_answers_the_compressed_prompt(backends):
    models = backends(compressor="tiny:llama-bpe-small", target="tiny:llama-bpe")
    text = long_prompt(models["compressor"], 300)
    params = SamplingParams(temperature=0, max_tokens=12)
    request = Request(messages=[{"role": "user", "content": text}], params=params)
    result = run(Pipeline("compress", models, {"ratio": 0.4}).run(request))
    info = result.meta["compression"]
    assert abs(info["achieved_ratio"] - 0.4) <= 0.04 and info["original_tokens"] > 300
    compressed = [{"role": "user", "content": result.meta["compressed_prompt"]}]
    (expected,) = run(models["target"].generate([run(models["target"].apply_chat_template(compressed))], params))
    assert result.token_ids == expected.token_ids
    assert result.meta["models"]["target"]["prompt_tokens"] < 0.6 * info["original_tokens"]


def test_windowed_surprisal_equals_a_forward_pass_within_the_first_window(backends):
    backend = backends(compressor="tiny:llama-bpe-small")["compressor"]
    ids = run(backend.encode(long_prompt(backend, 150)))[:150]
    with torch.no_grad():
        lp = torch.log_softmax(local_backend("tiny:llama-bpe-small").model(torch.tensor([ids])).logits[0].float(), -1)
    expected = -lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(run(token_surprisal(backend, ids, window=512, chunk=64)), expected, atol=1e-4)
    windowed = run(token_surprisal(backend, ids, window=64, chunk=16))  # 3 windows, 16 tokens of overlap
    np.testing.assert_allclose(windowed[:63], expected[:63], atol=1e-4)
    assert windowed.shape == expected.shape and np.isfinite(windowed).all()


def test_a_prompt_shorter_than_min_tokens_is_sent_unchanged(backends):
    models = backends(compressor="tiny:llama-bpe-small", target="tiny:llama-bpe")
    request = Request(messages=[{"role": "user", "content": "What is the capital of France?"}], params=SamplingParams(max_tokens=4))
    result = run(Pipeline("compress", models, {"ratio": 0.4}).run(request))
    assert result.meta["compressed_prompt"] == "What is the capital of France?"
    assert result.meta["compression"]["skipped"] and result.meta["compression"]["achieved_ratio"] == 1.0
