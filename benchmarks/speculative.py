"""Speculative decoding on SmolLM2-135M-Instruct with a layer-truncated draft (issue: Cooperation).

Same run, same machine, greedy, chat prompts:
  - target alone: `TransformersBackend.generate` (the anchor);
  - transformers `model.generate(assistant_model=draft)` (assisted generation) on the same pair;
  - collab_ray `speculative` in-process (Pipeline over two TransformersBackends);
  - 8 concurrent speculative requests vs 8 concurrent target-only requests.
Reports tokens/s, acceptance rate and mean accepted length; asserts that speculative greedy
output equals the target's token for token. Serve rows: pending the Serving issue.

The draft is derived from the target: its first `--draft-layers` decoder layers (and optionally
its last `--draft-last`), the final norm and the (tied) head, saved as safetensors in the cache.

    python benchmarks/speculative.py [--prompts 20] [--tokens 128] [--concurrent 8] [--draft-layers 24]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import torch
from common import markdown_table, write_results

from collab_ray.core import SamplingParams
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.strategy import Request
from collab_ray.models import packaged
from collab_ray.models.backend import TransformersBackend
from collab_ray.models.cache import building, cache_root

TARGET = "smollm2-135m-instruct"
PROMPTS = [
    "Explain how a lighthouse works.",
    "Write a short story about a fox who learns to swim.",
    "What are the main causes of the seasons on Earth?",
    "Give me a recipe for a simple tomato soup.",
    "Describe the water cycle for a ten-year-old.",
    "Why is the sky blue?",
    "List five tips for learning a new language.",
    "Write a poem about autumn leaves.",
    "How do vaccines train the immune system?",
    "Summarise the plot of Romeo and Juliet.",
    "What is the difference between weather and climate?",
    "Explain photosynthesis in simple terms.",
    "Write a letter to a friend describing your holiday by the sea.",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?",
    "Describe how bread rises.",
    "Explain what a computer program is.",
    "Tell me about the history of the printing press.",
    "Why do cats purr?",
    "Give advice to someone starting their first job.",
]


def truncated_draft(target: TransformersBackend, first: int, last: int) -> str:
    """Directory of the target cut to its first `first` and last `last` decoder layers (built once)."""
    out = cache_root() / "drafts" / f"{TARGET}-first{first}-last{last}"
    if not (out / "config.json").is_file():
        model = target.model
        layers = model.model.layers
        keep = list(range(first)) + list(range(len(layers) - last, len(layers)))
        with building(out) as tmp:
            cut = type(model)(model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": len(keep)}))
            state = model.state_dict()
            renamed = {}
            for name, tensor in state.items():
                if ".layers." in name:
                    index = int(name.split(".layers.")[1].split(".")[0])
                    if index not in keep:
                        continue
                    name = name.replace(f".layers.{index}.", f".layers.{keep.index(index)}.")
                renamed[name] = tensor
            cut.load_state_dict(renamed, strict=False)
            cut.tie_weights()
            cut.generation_config = model.generation_config
            cut.save_pretrained(tmp)
            target.tokenizer.save_pretrained(tmp)
    return str(out)


async def chat_ids(backend: TransformersBackend, text: str) -> list[int]:
    return await backend.encode(await backend.apply_chat_template([{"role": "user", "content": text}]))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20, help="prompts per row (at most %d)" % len(PROMPTS))
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--concurrent", type=int, default=8, help="requests in the concurrency rows (0 skips them)")
    ap.add_argument("--draft-layers", type=int, default=24, help="leading target layers kept in the draft")
    ap.add_argument("--draft-last", type=int, default=0, help="trailing target layers kept in the draft")
    ap.add_argument("--k", type=int, default=4, help="speculative: initial draft length")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    if not packaged.is_installed(TARGET):
        packaged.pull(TARGET, quiet=True)
    torch.manual_seed(0)
    target = TransformersBackend(TARGET, device=args.device)
    draft = TransformersBackend(truncated_draft(target, args.draft_layers, args.draft_last), device=args.device, name="draft")
    prompts = PROMPTS[: args.prompts]
    ids = [asyncio.run(chat_ids(target, p)) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    pipeline = Pipeline("speculative", {"draft": draft, "target": target}, {"k": args.k})

    prompts_text = [asyncio.run(target.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]

    def target_alone(i):
        return target.generate_sync([ids[i]], params)[0].token_ids

    def assisted(i):
        x = torch.tensor([ids[i]], device=target.device)
        with torch.inference_mode():
            y = target.model.generate(
                x, attention_mask=torch.ones_like(x), assistant_model=draft.model, do_sample=False,
                max_new_tokens=args.tokens, min_new_tokens=args.tokens,
            )
        return y[0, len(ids[i]) :].tolist()

    def speculative(i):
        return asyncio.run(pipeline.run(Request(prompt=prompts_text[i], params=params)))

    # warm-up: one short run of every path
    short = params.model_copy(update={"max_tokens": 8})
    target.generate_sync([ids[0]], short)
    asyncio.run(pipeline.run(Request(prompt=prompts_text[0], params=short)))

    # interleaved per prompt, so changes in the load of this shared machine hit every path alike
    load_before = os.getloadavg()
    paths = {"target_alone": target_alone, "assisted": assisted, "speculative": speculative}
    outputs = {name: [] for name in paths}
    seconds = dict.fromkeys(paths, 0.0)
    for i in range(len(ids)):
        for name, fn in paths.items():
            result, took = timed(lambda: fn(i))
            outputs[name].append(result)
            seconds[name] += took
    reference, hf, spec = outputs.values()
    t_target, t_hf, t_spec = seconds.values()
    n_tokens = sum(len(r) for r in reference)
    mismatches = [i for i, (r, s) in enumerate(zip(reference, spec)) if s.token_ids != r]
    assert not mismatches, f"speculative greedy differs from target alone on prompts {mismatches}"
    hf_same = sum(h == r for h, r in zip(hf, reference))
    proposed = sum(s.meta["proposed"] for s in spec)
    accepted = sum(s.meta["accepted"] for s in spec)
    rounds = sum(s.meta["rounds"] for s in spec)
    acceptance, mean_len = accepted / proposed, sum(len(s.token_ids) for s in spec) / rounds

    rows = [
        ["target alone (`generate`)", f"{n_tokens / t_target:.1f}", "1.00×", "–", "–", "anchor"],
        [
            "transformers `generate(assistant_model=…)`",
            f"{n_tokens / t_hf:.1f}",
            f"{t_target / t_hf:.2f}×",
            "–",
            "–",
            f"{hf_same}/{len(ids)} identical to target alone",
        ],
        [
            "collab_ray `speculative` in-process",
            f"{n_tokens / t_spec:.1f}",
            f"{t_target / t_spec:.2f}×",
            f"{acceptance:.2f}",
            f"{mean_len:.2f}",
            f"{len(ids)}/{len(ids)} identical (asserted)",
        ],
    ]
    data = {
        "target": TARGET,
        "draft": f"first {args.draft_layers} + last {args.draft_last} of 30 layers",
        "prompts": len(ids),
        "new_tokens": args.tokens,
        "k": args.k,
        "seconds": seconds,
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "tokens_per_s": {"target_alone": n_tokens / t_target, "assisted": n_tokens / t_hf, "speculative": n_tokens / t_spec},
        "acceptance_rate": acceptance,
        "mean_accepted_length": mean_len,
        "hf_assisted_identical": hf_same,
    }
    if args.concurrent:
        batch = (prompts_text * args.concurrent)[: args.concurrent]
        batch_ids = (ids * args.concurrent)[: args.concurrent]

        async def concurrent_target():
            return await asyncio.gather(*(target.generate([p], params) for p in batch_ids))

        async def concurrent_spec():
            return await asyncio.gather(*(pipeline.run(Request(prompt=p, params=params)) for p in batch))

        _, t_ct = timed(lambda: asyncio.run(concurrent_target()))
        many, t_cs = timed(lambda: asyncio.run(concurrent_spec()))
        n = args.concurrent * args.tokens
        assert all(m.token_ids == reference[i % len(reference)] for i, m in enumerate(many))
        rows += [
            [f"{args.concurrent} concurrent target-only requests", f"{n / t_ct:.1f}", "–", "–", "–", "aggregate tokens/s"],
            [
                f"{args.concurrent} concurrent `speculative` requests",
                f"{n / t_cs:.1f}",
                f"{t_ct / t_cs:.2f}× vs concurrent target",
                "–",
                "–",
                "aggregate tokens/s; identical (asserted)",
            ],
        ]
        data["concurrent"] = {"requests": args.concurrent, "target_tokens_per_s": n / t_ct, "speculative_tokens_per_s": n / t_cs}
    table = markdown_table(["path", "tokens/s", "speed-up vs target alone", "acceptance", "mean accepted length", "output"], rows)
    notes = (
        f"Target: SmolLM2-135M-Instruct (float32, {args.device}). Draft: the target's first {args.draft_layers}"
        f"{f' and last {args.draft_last}' if args.draft_last else ''} of 30 decoder layers + final norm + tied head, "
        f"no retraining (built by `truncated_draft`, saved as safetensors in the cache). Greedy, {len(ids)} chat prompts × "
        f"{args.tokens} new tokens (EOS ignored), speculative k = {args.k} adaptive (+2 when all accepted, −1 on a rejection, "
        "1..16); transformers' assisted generation uses its own schedule. Mean accepted length = output tokens per "
        "target verification (accepted drafts + the correction/bonus token). The in-process backend runs each model on "
        "one worker thread, so concurrent requests interleave rather than batch. The three single-request paths "
        f"run interleaved prompt by prompt; the machine is shared (1-minute load average {load_before[0]:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after on 2 cores), so absolute tokens/s are low and noisy.\n\n"
        "Serve rows: pending the Serving issue."
    )
    if (len(ids), args.tokens, args.concurrent) != (20, 128, 8):
        notes += (
            f"\n\nCounts reduced from the issue's 20 prompts × 128 tokens and 8 concurrent requests to {len(ids)} × "
            f"{args.tokens} and {args.concurrent}, to fit about 15 minutes on this shared machine; the defaults run the full set."
        )
    print(table)
    print("written:", write_results("speculative", "Speculative decoding: SmolLM2-135M-Instruct with a truncated draft", table, data, notes))


if __name__ == "__main__":
    main()
