"""nanochat on Ray Serve: engine replicas with continuous batching, an OpenAI-compatible HTTP API and a
Gradio chat page. `serve run serve_app:app` serves the latest chat checkpoint with default settings;
`serve_app.build_app` (or `python -m serve_app`) takes settings (see serve_app/app.py)."""
import ray_jobs  # noqa: F401 (first: its Ray settings must be in place before ray is imported)


def __getattr__(name):
    # `app` is built on first use, not at import: importing serve_app stays cheap and side-effect free
    if name == "app":
        from serve_app.app import build_app
        return build_app()
    if name == "build_app":
        from serve_app.app import build_app
        return build_app
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
