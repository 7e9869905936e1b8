"""`aiaas-lab serve`: parse the options, refuse to run unauthenticated by accident, start uvicorn."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from .._procs import DEFAULT_JOB_MEMORY_MB

__all__ = ["serve_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiaas-lab serve",
        description="Serve remote training jobs (/v1) and trained models over the Open Inference Protocol (/v2).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one and prints it)")
    parser.add_argument("--data-dir", default="aiaas-data", type=Path,
                        help="where jobs, events, models and uploads are kept (default ./aiaas-data)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN",
                        help="a bearer token clients must send (repeatable); these tokens share one tenant")
    parser.add_argument("--tokens-file", type=Path, metavar="FILE",
                        help="a file of 'TOKEN TENANT' lines; each tenant sees only its own jobs, data and models")
    parser.add_argument("--max-jobs", type=int, default=2, metavar="N", help="training jobs run at once (default 2)")
    parser.add_argument("--max-upload-mb", type=float, default=256, metavar="N",
                        help="largest request body in MB (default 256); larger ones get 413")
    parser.add_argument("--job-memory-mb", type=int, default=DEFAULT_JOB_MEMORY_MB, metavar="N",
                        help=f"memory each process of a training job may allocate, in MB (default {DEFAULT_JOB_MEMORY_MB}; 0: no "
                             "limit); a job that needs more fails with a reason that says so")
    parser.add_argument("--max-header-kb", type=int, default=64, metavar="N",
                        help="largest request line and headers in KiB (default 64); larger ones get 431")
    parser.add_argument("--body-timeout-s", type=float, default=30, metavar="S",
                        help="seconds a request's headers may take to arrive in full, and its body may pause "
                             "(default 30); then 408")
    parser.add_argument("--infer-threads", type=int, default=0, metavar="N",
                        help="inference forward passes run at once (default: the cores, at most 8)")
    parser.add_argument("--infer-queue", type=int, default=64, metavar="N",
                        help="inference requests that may wait for a thread (default 64); more get 503")
    parser.add_argument("--allow-code", action="store_true",
                        help="accept models sent as code (cloudpickle): clients can then run any code on this machine")
    parser.add_argument("--insecure", action="store_true", help="serve without any token (trusted machines only)")
    return parser


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket made here so that --port 0 can report the port it got. The protocol
    must be IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    without it every response waits ~40 ms for a delayed ACK (Nagle's algorithm)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve_main(argv: list[str]) -> int:
    parser = _parser()
    opts = parser.parse_args(argv)
    from ._auth import DEFAULT_TENANT, load_tokens_file

    tokens = {token: DEFAULT_TENANT for token in opts.token}
    if opts.tokens_file is not None:
        try:
            tokens.update(load_tokens_file(opts.tokens_file))
        except (OSError, ValueError) as exc:
            parser.error(f"--tokens-file: {exc}")
    if any(not token for token in tokens):
        parser.error("--token: a token cannot be empty")
    if not tokens and not opts.insecure:
        parser.error("no token given, and the server will not run without authentication by accident; pass "
                     "--token TOKEN or --tokens-file FILE (or --insecure on a trusted machine)")
    if not tokens and opts.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"aiaas-lab serve: warning: --insecure on {opts.host}: anyone who can reach this address can "
              "train and read models here", file=sys.stderr)
    if opts.max_jobs < 1:
        parser.error(f"--max-jobs: expected a whole number >= 1, but found {opts.max_jobs}")
    if not opts.max_upload_mb > 0:
        parser.error(f"--max-upload-mb: expected a number > 0, but found {opts.max_upload_mb}")
    if opts.job_memory_mb != 0 and not 1024 <= opts.job_memory_mb <= 2**40:
        parser.error(f"--job-memory-mb: expected 0 (no limit) or a whole number of MB >= 1024 (a job's runner "
                     f"holds ~450 MB with torch imported before it loads any data), but found {opts.job_memory_mb}")
    for name, low in (("max_header_kb", 1), ("infer_threads", 0), ("infer_queue", 0)):
        if getattr(opts, name) < low:
            parser.error(f"--{name.replace('_', '-')}: expected a whole number >= {low}, but found {getattr(opts, name)}")
    if not 0 < opts.body_timeout_s < 10**6:
        parser.error(f"--body-timeout-s: expected a number of seconds > 0, but found {opts.body_timeout_s}")

    import torch
    import uvicorn

    from .._errors import AiaasError
    from ._app import ServerConfig, create_app

    torch.set_num_threads(1)  # inference: one thread per request beats contention among many
    try:
        sock = _listen(opts.host, opts.port)
    except OSError as exc:
        print(f"aiaas-lab serve: cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    config = ServerConfig(data_dir=opts.data_dir.resolve(), tokens=tokens, max_jobs=opts.max_jobs,
                          job_memory_mb=opts.job_memory_mb,
                          max_upload_mb=opts.max_upload_mb, allow_code=opts.allow_code,
                          infer_threads=opts.infer_threads, infer_queue=opts.infer_queue,
                          body_timeout_s=opts.body_timeout_s)
    try:
        app = create_app(config)
    except (OSError, AiaasError) as exc:
        sock.close()
        reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"aiaas-lab serve: {reason}", file=sys.stderr)
        return 1
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    tenants = len(set(tokens.values()))
    auth = f"{len(tokens)} token{'s' if len(tokens) != 1 else ''}, {tenants} tenant{'s' if tenants != 1 else ''}" \
        if tokens else "NO AUTHENTICATION (--insecure)"
    print(f"aiaas-lab serve: listening on http://{host}:{port} (data in {config.data_dir}; {auth}"
          f"{'; --allow-code' if opts.allow_code else ''})", flush=True)
    # httptools (a dependency) parses HTTP ~30% faster than h11 on the infer path; uvloop added
    # nothing measurable there, so the standard loop it is. Its protocol gets the head bounds
    # uvicorn lacks (see _limits).
    from ._limits import bounded_httptools

    http = bounded_httptools(opts.max_header_kb * 1024, opts.body_timeout_s)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           loop="asyncio", http=http, timeout_graceful_shutdown=3))
    try:
        # uvicorn turns SIGTERM and SIGINT into a graceful shutdown (the executor stops every job
        # process group; the jobs resume at the next start), then raises the signal again once
        # it is done: for SIGINT that is a KeyboardInterrupt, which here is no error.
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        print("aiaas-lab serve: stopped (interrupted)", file=sys.stderr)
        return 130
    return 0
