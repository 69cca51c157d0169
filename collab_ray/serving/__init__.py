"""Ray Serve layer: the only package that imports Ray Serve.

`ModelServer` (one deployment per model), `ServeBackend` (a `ModelBackend` over a deployment
handle), `Coordinator` (runs pipelines), the OpenAI-compatible API, and `build_app`.
"""
