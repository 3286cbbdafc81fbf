"""`kblam serve`: an HTTP server over a KB store (FastAPI + uvicorn, the `kblam[serve]` extra).

    from kblam.serve import ServeConfig, create_app
    app = create_app(model, "facts.kbstore", ServeConfig())   # then uvicorn.run(app)

app.py has the routes, openai.py the OpenAI-compatible chat, batching.py the micro-batcher,
kbservice.py the store's writer and readers, security.py keys and limits, metrics.py Prometheus,
static/ the page, cli.py the command. docs/serving.md says how to run and measure it.
"""

__all__ = ["Limits", "ServeConfig", "create_app"]


def __getattr__(name: str):
    # Lazy: the `kblam` command imports kblam.serve.cli for its --help, without FastAPI installed.
    if name in ("ServeConfig", "create_app"):
        from kblam.serve import app

        return getattr(app, name)
    if name == "Limits":
        from kblam.serve.security import Limits

        return Limits
    raise AttributeError(f"module 'kblam.serve' has no attribute {name!r}")
