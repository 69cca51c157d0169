"""Strategies: collaboration logic written once against `ModelBackend`, registered by name.

A strategy takes named models (roles such as `draft`/`target`, or an ordered list), a request,
and returns a `StrategyResult` whose `meta` says what it decided. The same strategy runs over
in-process backends and over Ray Serve deployment handles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

from collab_ray.core.backend import ModelBackend
from collab_ray.core.errors import ConfigError
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.types import Usage

Emit = Callable[[str], Awaitable[None]]  # receives text deltas as a strategy produces them (streaming)

# packages whose modules register strategies when imported
STRATEGY_PACKAGES = ("collab_ray.core.single", "collab_ray.ensemble", "collab_ray.cooperate")


@dataclass
class Request:
    """What a pipeline is asked: a completion prompt or chat messages, and sampling parameters."""

    prompt: str | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a request needs exactly one of prompt or messages")


@dataclass
class StrategyResult:
    """The answer of a pipeline, and what the strategy did to get it."""

    text: str
    finish_reason: str = "stop"  # "stop" | "length"
    usage: Usage = field(default_factory=Usage)  # as the user sees it: prompt and completion tokens
    token_ids: list[int] | None = None  # in the vocabulary of `meta["output_model"]` when set
    logprobs: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy:
    """Base of every strategy. Subclasses set `name`, `roles` or `min_models`, `Params`, and `run`."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...] | None] = None  # fixed named roles; None: an ordered list of models
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: dict | BaseModel | None = None):
        self.params = self.Params.model_validate(params or {})

    @classmethod
    def check_models(cls, names: list[str] | dict[str, str], where: str = "models") -> None:
        """Refuse model assignments the strategy cannot use; errors name the path and value."""
        if cls.roles is not None:
            if not isinstance(names, dict):
                raise ConfigError(f"{where}: strategy {cls.name!r} takes roles {list(cls.roles)}, got a list {names!r}")
            unknown = sorted(set(names) - set(cls.roles))
            missing = sorted(set(cls.roles) - set(names))
            if unknown:
                raise ConfigError(f"{where}: strategy {cls.name!r} has no role {unknown[0]!r} (roles: {list(cls.roles)})")
            if missing:
                raise ConfigError(f"{where}: strategy {cls.name!r} needs role {missing[0]!r}")
        elif isinstance(names, dict):
            raise ConfigError(f"{where}: strategy {cls.name!r} takes a list of models, got roles {names!r}")
        elif len(names) < cls.min_models:
            raise ConfigError(f"{where}: strategy {cls.name!r} needs at least {cls.min_models} models, got {len(names)}")
        elif cls.max_models is not None and len(names) > cls.max_models:
            raise ConfigError(f"{where}: strategy {cls.name!r} takes at most {cls.max_models} models, got {names!r}")

    async def run(self, models: dict[str, ModelBackend], request: Request, emit: Emit | None = None) -> StrategyResult:
        raise NotImplementedError


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy to the registry under `cls.name`."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"strategy {cls.name!r} registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def load_strategies() -> dict[str, type[Strategy]]:
    """Import every strategy module (they register themselves) and return the registry."""
    for package in STRATEGY_PACKAGES:
        try:
            module = importlib.import_module(package)
        except ModuleNotFoundError as e:
            if e.name != package:
                raise
            continue
        for sub in getattr(module, "STRATEGY_MODULES", ()):
            importlib.import_module(f"{package}.{sub}")
    return STRATEGIES


def get_strategy(name: str) -> type[Strategy]:
    strategies = load_strategies()
    if name not in strategies:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(sorted(strategies))}")
    return strategies[name]


async def render_prompt(backend: ModelBackend, request: Request) -> str:
    """The request as this model's prompt text: its chat template for messages, else a completion prompt.

    A model without a chat template is a base (completion) model: it continues text, and a chat
    transcript makes it continue the conversation, often repeating the question. One question (with an
    optional system message before it) becomes "Question: …\nAnswer:", the format base models saw in
    pre-training (QA pages, benchmarks); a longer conversation becomes a "User:/Assistant:" transcript.
    Such a model writes the next turn itself: `with_turn_stops` ends the answer there.
    """
    if request.messages is None:
        return request.prompt
    if (await backend.info()).has_chat_template:
        return await backend.apply_chat_template(request.messages)
    system = [m["content"] for m in request.messages if m["role"] == "system"]
    turns = [m for m in request.messages if m["role"] != "system"]
    head = "".join(f"{s}\n\n" for s in system)
    if len(turns) == 1 and turns[0]["role"] == "user":
        return f"{head}Question: {turns[0]['content']}\nAnswer:"
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in turns]
    return head + "\n".join(lines) + "\nAssistant:"


TURN_STOPS = ("\nQuestion:", "\nUser:")  # where `render_prompt`'s completion format starts a new turn


async def with_turn_stops(models: dict[str, ModelBackend], request: Request) -> Request:
    """The request with `TURN_STOPS` added to its stop strings when it is a chat and a model has no chat template.

    A base model asked in the completion format answers, then goes on with "Question: …" of its own (the
    echo a user of a chat API never wants); a chat template's end-of-turn token does this for chat models.
    Measured on Gemma-3-270M (base): "The sky is blue because …\nQuestion: Why is the sky blue? …" until
    max_tokens, and `vote`'s medoid then picked such a continuation.
    """
    if request.messages is None:
        return request
    infos = await asyncio.gather(*(b.info() for b in models.values()))
    if all(i.has_chat_template for i in infos):
        return request
    stop = request.params.stop + tuple(s for s in TURN_STOPS if s not in request.params.stop)
    return dataclasses.replace(request, params=request.params.model_copy(update={"stop": stop}))
