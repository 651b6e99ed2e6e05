"""`quire serve`: the library behind an OpenAI-compatible HTTP API (app/server.py).

    quire serve [--host 127.0.0.1] [--port 8765] [--api-key KEY] [--model NAME]

The service is the app's own (`LocalService` from settings.json, as the window loads
it); the key may also come from the environment (QUIRE_API_KEY), which keeps it off
the process list. Ctrl-C stops the server.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from dataclasses import replace

from app.server import DEFAULT_HOST, DEFAULT_PORT


def cmd_serve(args: argparse.Namespace) -> int:
    from app.server import QuireServer, is_loopback
    from app.service import LocalService
    from app.settings import load_settings

    api_key = args.api_key or os.environ.get("QUIRE_API_KEY") or None
    if not is_loopback(args.host) and api_key is None:
        print(f"quire: warning: serving {args.host} without an API key: anyone who reaches this port can read "
              "the library (set --api-key or QUIRE_API_KEY)", file=sys.stderr)
    settings = load_settings()
    if args.model:
        settings = replace(settings, model=args.model)
    service = LocalService(settings)
    try:
        server = QuireServer(service, host=args.host, port=args.port, api_key=api_key,
                             max_tokens=settings.max_answer_tokens)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            print(f"quire: error: port {args.port} is in use: choose another with --port", file=sys.stderr)
            return 1
        raise
    print(f"quire serve: {service.model_name} on {service.device}, OpenAI API at {server.url}"
          + (" (API key required)" if api_key else "") + "; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("quire serve: stopped", file=sys.stderr)
    finally:
        server.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = subparsers.add_parser("serve", help="answer over the library through an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $QUIRE_API_KEY, else none)")
    serve.add_argument("--model", help="installed model name, .gguf file or model folder (default: the settings' choice)")
    serve.set_defaults(func=cmd_serve)
