"""Staying current: no FutureWarning or DeprecationWarning comes out of collab_ray's own calls into its
dependencies (transformers deprecates an argument one minor version and removes it a few later; the
upper bounds in pyproject.toml are the versions this suite last passed on).

A warning counts as collab_ray's when a frame of collab_ray's package is on the stack where it is
raised: transformers' `deprecate_kwarg` attributes its warning to torch's module-call machinery,
so a filter on the warning's module would miss it.
"""

import traceback
import warnings
from pathlib import Path

from conftest import local_backend, run

import collab_ray
from collab_ray.core.pipeline import Pipeline
from collab_ray.core.sampling import SamplingParams
from collab_ray.core.strategy import Request

PACKAGE = Path(collab_ray.__file__).resolve().parent


def raised_from_collab_ray(fn) -> list[str]:
    """Run fn(); the FutureWarnings/DeprecationWarnings raised with a collab_ray frame on the stack."""
    found: list[str] = []

    def hook(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            ours = [f for f in traceback.extract_stack()[:-1] if Path(f.filename).resolve().is_relative_to(PACKAGE)]
            if ours:
                found.append(f"{category.__name__}: {message} (from {ours[-1].filename}:{ours[-1].lineno})")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        fn()
    return found


def test_the_hook_sees_warnings_raised_below_collab_ray():
    from collab_ray.cooperate.federated import repair

    class Deprecated:  # a dependency that warns when collab_ray calls it
        async def generate(self, prompts, params):
            warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=2)
            (g,) = await local_backend("tiny:llama-bpe").generate(prompts[:1], params)
            return [g]

    found = raised_from_collab_ray(lambda: run(repair(Deprecated(), "Question: Who?\nAnswer:", "It is [NAME_9].", {})))
    assert len(found) == 1 and "past_key_values" in found[0] and "federated.py" in found[0]
    assert raised_from_collab_ray(lambda: warnings.warn("x", FutureWarning)) == []  # from the test itself: not ours


def test_model_and_strategy_calls_raise_no_deprecation_warnings():
    def exercise():
        model = local_backend("tiny:llama-bpe")
        params = SamplingParams(temperature=0, max_tokens=4)
        run(model.generate(["The river"], params))
        run(model.loglikelihood([("The river", " runs")]))
        s = run(model.open_session(run(model.encode("The river"))))
        draft = run(model.propose(s.session_id, 3, params))
        run(model.rollback(s.session_id, s.length + 1))
        run(model.append(s.session_id, draft.tokens[1:], all_positions=True))
        run(model.close_session(s.session_id))
        models = {"draft": local_backend("tiny:llama-bpe-small"), "target": model}
        for strategy, roles in (("speculative", models), ("fuse", {"a": model, "b": local_backend("tiny:llama-sp")})):
            run(Pipeline(strategy, roles).run(Request(prompt="The river", params=params)))

    assert raised_from_collab_ray(exercise) == []
