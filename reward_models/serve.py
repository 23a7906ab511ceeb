"""``python scripts/serve_reward.py --model PATH``: serve a reward model over HTTP (see ``reward_models.api``).

The server listens before the model is loaded (/healthz answers at once, /readyz once the model is
warm) and prints ``serving on http://HOST:PORT`` when it listens; ``--port 0`` picks a free port.
The API key is read from an environment variable (``--api-key-env``, default RLHF_API_KEY), never from a
flag: flags show up in ``ps`` and shell history. Binding beyond loopback without a key prints a warning.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import threading
import time

from .api import Limits, create_app
from .connections import ConnectionLimits
from .gate import api_key_from_env
from .replicas import LOAD_FAILED, supervise
from .scoring import resolve_reward_model_path
from .shutdown import SETTLE_S, GracefulServer

log = logging.getLogger("reward_models.serve")


def parse_args(argv=None) -> argparse.Namespace:
    d = Limits()
    # no abbreviations: "--api-key SECRET" must fail, not silently mean "--api-key-env SECRET"
    p = argparse.ArgumentParser(prog="serve_reward", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="reward model directory (or Hub id)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback only unless told)")
    p.add_argument("--port", type=int, default=8000, help="0 = pick a free port (printed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (none: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights' dtype")
    p.add_argument("--allow-untrained-head", action="store_true",
                   help="serve a checkpoint that has no score head (its head is random: for tests only)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per item (none: what the RM was trained with, else the model's position limit)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (none: torch's)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="padded tokens per forward")
    p.add_argument("--max-batch-items", type=int, default=d.max_batch_items, help="items per forward")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long an item waits for a batch")
    p.add_argument("--wait-policy", default=d.wait_policy, choices=("adaptive", "always"),
                   help="adaptive: wait only when requests arrive closer than max-wait; always: always wait")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="items waiting; beyond: 429")
    p.add_argument("--max-items", type=int, default=d.max_items, help="items per request; beyond: 413")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body size; beyond: 413")
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens, help="tokens per request; beyond: 413")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s, help="seconds; then 503")
    c = ConnectionLimits()
    p.add_argument("--timeout-header", type=float, default=c.timeout_header_s,
                   help="seconds a connection has to send complete request headers; then it is closed")
    p.add_argument("--timeout-body", type=float, default=c.timeout_body_s,
                   help="seconds from the headers to the end of the body; then the connection is closed")
    p.add_argument("--timeout-keep-alive", type=int, default=c.timeout_keep_alive_s,
                   help="seconds an idle connection is kept open between requests")
    p.add_argument("--limit-concurrency", type=int, default=c.limit_concurrency,
                   help="open connections + requests in progress; beyond: 503")
    p.add_argument("--max-header-bytes", type=int, default=c.max_header_bytes,
                   help="request line + headers; beyond: 400")
    p.add_argument("--render-concurrency", type=int, default=d.render_concurrency,
                   help="large requests tokenized at once; the others wait their turn")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port, each with its own copy of the model")
    p.add_argument("--shutdown-grace", type=float, default=20.0,
                   help="seconds in-flight work may take after SIGTERM; then it is answered 503 "
                        "(under Kubernetes' 30 s terminationGracePeriodSeconds)")
    p.add_argument("--openrlhf-reward", default="normalized", choices=("normalized", "raw"),
                   help="what OpenRLHF's /get_reward answers: rewards normalized with the RM's training statistics, or raw")
    p.add_argument("--api-key-env", default=d.api_key_env, help="environment variable holding the API key")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="log level")
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = _limits(args)
        has_key = api_key_from_env(args.api_key_env) is not None
        resolve_reward_model_path(args.model)
    except (FileNotFoundError, ValueError) as exc:  # before listening: nothing to serve
        log.error("%s", exc)
        return 2
    if not is_loopback(args.host) and not has_key:
        log.warning("binding %s without an API key: anyone who can reach this port can use the model; "
                    "set %s to require a bearer token", args.host, args.api_key_env)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say they are TCP, and without it
    # Nagle + delayed ACK add 40 ms to every answer on a keep-alive connection
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"
    # tests and scripts read the port from this line
    announcement = f"serving on {url} (auth {'on' if has_key else 'off'}; ready at {url}/readyz)"
    if args.workers > 1:
        sock.listen(2048)  # connections wait in the backlog until a worker accepts them
        print(f"{announcement}; {args.workers} workers", flush=True)
        return supervise(args.workers, serve, args, sock)
    return serve(args, sock, limits, announcement)


def _limits(args) -> Limits:
    return Limits(max_body_bytes=args.max_body_bytes, max_items=args.max_items, max_total_tokens=args.max_total_tokens,
                  max_batch_tokens=args.max_batch_tokens, max_batch_items=args.max_batch_items,
                  max_wait_ms=args.max_wait_ms, wait_policy=args.wait_policy, max_queue=args.max_queue,
                  request_timeout_s=args.request_timeout, render_concurrency=args.render_concurrency,
                  api_key_env=args.api_key_env)


def serve(args, sock: socket.socket, limits: Limits | None = None, announcement: str | None = None) -> int:
    """One server process on ``sock``, until SIGTERM/SIGINT; 1 if the model failed to load."""
    import uvicorn

    if not logging.getLogger().handlers:  # a --workers process starts bare
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s %(name)s [{os.getpid()}]: %(message)s")
    if args.threads:  # here, in the main thread: threads started later inherit it, the loader's would not
        import torch

        torch.set_num_threads(args.threads)

    def load():
        from .scoring import RewardScorer

        log.info("loading %s", args.model)
        return RewardScorer(args.model, device=args.device, dtype=args.dtype, max_length=args.max_length,
                            allow_untrained_head=args.allow_untrained_head)

    def stop():  # a server whose model failed to load only confuses its callers: exit non-zero
        server.should_exit = True

    app = create_app(load, limits or _limits(args), on_load_failure=stop, openrlhf_reward=args.openrlhf_reward)
    connections = ConnectionLimits(args.timeout_header, args.timeout_body, args.timeout_keep_alive,
                                   args.limit_concurrency, args.max_header_bytes)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=int(SETTLE_S),
                            log_config=None,  # our basicConfig; uvicorn's access log would add client addresses
                            **connections.uvicorn_settings())
    server = GracefulServer(config, app.state.rm, args.shutdown_grace)

    def announce():  # once uvicorn accepts connections
        while not (server.started or server.should_exit):
            time.sleep(0.02)
        if server.started and announcement:
            print(announcement, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])  # uvicorn's own loop set-up: uvloop/httptools when installed
    return LOAD_FAILED if app.state.rm.failed else 0


if __name__ == "__main__":
    sys.exit(main())
