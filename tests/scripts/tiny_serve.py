"""A real uvicorn server over a tiny random model and the hash encoder (tests/test_serve_process.py).

    python tests/scripts/tiny_serve.py STORE     # prints "port N" once it listens; the store must exist
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, serve_fixtures

import uvicorn  # noqa: E402
from serve_fixtures import make_app, tiny_model  # noqa: E402

from kblam.serve.cli import _bind  # noqa: E402

if __name__ == "__main__":
    app = make_app(tiny_model(), Path(sys.argv[1]), allowed_hosts=None)
    sock = _bind("127.0.0.1", 0)
    print(f"port {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
