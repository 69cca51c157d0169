"""`collab-ray merge` and `collab-ray soup`: argparse wiring (`register`) and the command functions."""

from __future__ import annotations

import argparse
import sys

from collab_ray.core.errors import CollabError


def register(subparsers) -> None:
    """Add the `merge` and `soup` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "merge",
        help="merge models as a mergekit YAML says (streamed, HF safetensors out)",
        description="Merge models as a mergekit YAML config says; writes sharded safetensors, config and tokenizer.",
    )
    p.add_argument("config", metavar="MERGE.yaml", help="mergekit merge configuration")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created; must not exist unless --overwrite)")
    _output_options(p)
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random methods (dare_*, della*), default 0")
    p.add_argument(
        "--extract-lora",
        type=int,
        metavar="RANK",
        help="write the merge's difference to its base_model as a PEFT LoRA adapter of this rank instead of the merged model",
    )
    p.set_defaults(func=run_merge)

    s = subparsers.add_parser(
        "soup",
        help="average fine-tunes of one model: uniform or greedy soup",
        description="Model soups (Wortsman et al. 2022): uniform averages all models; greedy adds models in "
        "order of their score and keeps each only if the held-out score does not drop.",
    )
    s.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    s.add_argument("models", metavar="MODEL", nargs="+", help="model directories (same architecture)")
    s.add_argument("--method", choices=("uniform", "greedy"), default="uniform", help="soup recipe (default uniform)")
    s.add_argument("--eval-text", help="greedy: text file whose perplexity ranks the models")
    s.add_argument("--held-out-text", help="greedy: text file deciding whether to keep a model (default: --eval-text)")
    s.add_argument("--seq-len", type=int, default=128, help="greedy: tokens per evaluated sequence")
    s.add_argument("--max-tokens", type=int, default=4096, help="greedy: tokens of each text file used")
    _output_options(s)
    s.set_defaults(func=run_soup)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="device for the arithmetic, e.g. cuda (default cpu)")
    p.add_argument("--out-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MiB (default 2GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_merge(args: argparse.Namespace) -> int:
    from collab_ray.merge.engine import merge

    return _report(
        lambda: merge(
            args.config,
            args.out_dir,
            device=args.device,
            out_shard_size=args.out_shard_size,
            seed=args.random_seed,
            overwrite=args.overwrite,
            progress=args.progress,
            extract_lora=args.extract_lora,
        )
    )


def run_soup(args: argparse.Namespace) -> int:
    from collab_ray.merge.soup import greedy_soup, perplexity_scorer, uniform_soup

    def soup():
        models = args.models
        if args.method == "greedy":
            if not args.eval_text:
                raise CollabError("--method greedy needs --eval-text")
            options = dict(reference_dir=models[0], seq_len=args.seq_len, max_tokens=args.max_tokens, device=args.device)
            score = perplexity_scorer(args.eval_text, **options)
            held_out = perplexity_scorer(args.held_out_text, **options) if args.held_out_text else score
            models = greedy_soup(models, score, held_out, device=args.device)
            print(f"greedy soup keeps {len(models)} of {len(args.models)}: {', '.join(models)}")
        return uniform_soup(
            models, args.out_dir, device=args.device, out_shard_size=args.out_shard_size, overwrite=args.overwrite, progress=args.progress
        )

    return _report(soup)


def _report(run) -> int:
    try:
        out = run()
    except CollabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collab-ray")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
