"""`kblam serve KB`: the command. Imports nothing heavy until it runs (the CLI loads it for --help)."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

_NEEDS = "kblam serve needs the serve extra: pip install 'kblam[serve]' (FastAPI, uvicorn, python-multipart, " \
         "prometheus-client)"


def add_parser(commands) -> None:
    p = commands.add_parser(
        "serve", help="serve a KB over HTTP: answers, OpenAI-compatible chat, triples, a web page",
        description="Serve a KB store over HTTP (docs/serving.md): POST /v1/ask, POST /v1/chat/completions, "
                    "the KB endpoints under /v1/kb, /healthz, /metrics, the API's description at /docs and a "
                    "web page at /. Stop it with Ctrl-C.")
    p.add_argument("kb", metavar="KB", help="a KB store folder; a KB file (CSV/TSV, JSON, JSONL, parquet) is imported "
                                            "into a store beside it (FILE.kbstore) on first start")
    p.add_argument("--adapter", default=None, help="an adapter folder (default: the embedded default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed at start)")
    p.add_argument("--api-key-file", default=None,
                   help="a file holding the API key: every endpoint then needs 'Authorization: Bearer KEY'")
    p.add_argument("--create", action="store_true", help="make an empty store at KB when there is none")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages of this origin call the API from a browser (repeatable; default: none)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="most questions answered as one batch (default 32; 1: one at a time)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a question waits for others to batch with when the server is idle (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the largest max_new_tokens a request may ask")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest KB file upload (default 64)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from kblam.serve.security import Limits, check_bind, read_api_key

    if not 0 <= args.port <= 65535 or args.max_batch < 1 or args.batch_window_ms < 0 or args.max_new_tokens < 1 \
            or args.max_upload_mb <= 0:
        raise ValueError("need 0 <= --port <= 65535, --max-batch >= 1, --batch-window-ms >= 0, "
                         "--max-new-tokens >= 1 and --max-upload-mb > 0")
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    check_bind(args.host, api_key)  # before the model loads: a refused start is immediate
    try:
        import uvicorn

        from kblam.serve.app import ServeConfig, create_app
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{_NEEDS}; missing: {err.name}") from None
    from transformers.utils import logging as hf_logging

    from kblam.model import KBLaM

    hf_logging.disable_progress_bar()
    sock = _bind(args.host, args.port)  # before loading: a port in use fails at once
    model = KBLaM.from_pretrained(args.adapter)
    store = _store_for(Path(args.kb), model, args.create)
    limits = Limits(max_new_tokens=args.max_new_tokens, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_questions=min(Limits.max_questions, args.max_batch))
    config = ServeConfig(host=args.host, port=sock.getsockname()[1], api_key=api_key, cors_origins=args.cors_origin,
                         limits=limits, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch)
    app = create_app(model, store, config)
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    print(f"kblam: serving {store} ({len(app.state.kblam.kb.reader()):,} triples) on "
          f"http://{host}:{config.port}" + (" (API key required)" if api_key else ""), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10))
    server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)  # clients that connect while the app starts wait in the backlog
    return sock


def _store_for(path: Path, model, create: bool) -> Path:
    """The store to serve: KB itself, the store imported from a KB file (FILE.kbstore), or a new empty one."""
    from kblam.store import KBStore, is_store
    from kblam.store.importer import import_sources

    if is_store(path):
        return path
    if path.is_file():
        target = path.with_suffix(".kbstore")
        if is_store(target):
            print(f"kblam: serving {target}, imported from {path} before (delete it to import again)", flush=True)
            return target
        # Imported beside the target and renamed when complete: an interrupted import is resumed on the next
        # start, and never served half-done.
        partial = target.with_name(f".{target.name}.importing")
        cfg = model.config
        store = KBStore.open(partial, model.encoder) if is_store(partial) else KBStore.create(
            partial, model.encoder, key_template=cfg.key_template, value_template=cfg.value_template)
        with store:
            stats = import_sources(store, [path], strict=True, progress=None)  # a bar on a terminal
        if target.exists():
            raise FileExistsError(f"{target} exists and is not a KB store; move it away to import {path}")
        os.replace(partial, target)
        print(f"kblam: imported {stats['rows']:,} rows of {path} into {target}", flush=True)
        return target
    if path.exists():
        raise ValueError(f"{path} is a folder but not a KB store (no manifest.json in it)")
    if not create:
        raise FileNotFoundError(f"{path}: no such KB store or file; pass --create to start an empty store there")
    cfg = model.config
    KBStore.create(path, model.encoder, key_template=cfg.key_template, value_template=cfg.value_template).close()
    return path

