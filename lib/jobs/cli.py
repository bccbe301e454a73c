"""Batches of async predictions with webhooks: submit a JSONL file of inputs to a Cog server or to Replicate,
receive the webhooks (outputs saved to disk, a SQLite ledger of every job), check, resubmit what failed.

  python scripts/jobs.py receive [--port 8787]        # env: REPLICATE_WEBHOOK_SECRET and/or WEBHOOK_AUTH_TOKEN
  python scripts/jobs.py submit prompts.jsonl --webhook URL (--cog-url URL | --model O/N[:VER] | --version VER
                                                            | --deployment O/N) [--wait]
  python scripts/jobs.py status [--json]
  python scripts/jobs.py resubmit --webhook URL BACKEND [--wait]

A JSONL line is {"id": "cat-1", "input": {"prompt": "a cat", "mode": "lcm"}} or just the input object. The
receiver and the runner share the ledger file (--ledger, default jobs/ledger.sqlite), so run them on one
machine; --webhook is the receiver's public URL (e.g. https://host.example/webhook). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from lib.jobs import runner as jobs
from lib.jobs.ledger import SETTLED, Ledger
from lib.jobs.receiver import Receiver
from lib.jobs.webhooks import DEFAULT_TOLERANCE, Authenticator
from lib.settings import Settings


def say(msg: str) -> None:
    print(msg, flush=True)


def backend_from(args):
    if args.cog_url:
        if args.model or args.version or args.deployment:
            raise jobs.JobsError("give --cog-url or a Replicate target (--model, --version, --deployment), not both")
        return jobs.CogBackend(args.cog_url)
    if not (args.model or args.version or args.deployment):
        raise jobs.JobsError("say where to run: --cog-url URL, or --model, --version or --deployment on Replicate")
    return jobs.ReplicateBackend(model=args.model, version=args.version, deployment=args.deployment)


def cmd_receive(args) -> int:
    settings = Settings()
    auth = Authenticator(
        secret=settings.replicate_webhook_secret, token=settings.webhook_auth_token, tolerance=args.tolerance
    )
    receiver = Receiver(args.ledger, args.out, auth, log=say)
    server = receiver.server(args.host, args.port)
    host, port = server.server_address[:2]
    stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say(f"receiver: listening on http://{host}:{port}/webhook; ledger {args.ledger}, images in {args.out}/")
    server.serve_forever()
    server.server_close()
    return 0


def finish(ledger: Ledger, args, keys=None) -> int:
    if not args.wait:
        return 0
    counts = jobs.wait(ledger, keys, timeout=args.wait, log=say)
    done = sum(counts.get(s, 0) for s in SETTLED)
    if done < sum(counts.values()):
        say(f"timed out after {args.wait:g} s with jobs still running (see: scripts/jobs.py status)")
    return 0 if set(counts) <= {"succeeded"} else 1


def cmd_submit(args) -> int:
    batch = jobs.read_jobs(args.file)
    ledger = Ledger(args.ledger)
    result = jobs.submit_batch(ledger, backend_from(args), batch, args.webhook, log=say, patience=args.patience)
    say(f"submitted {result['sent']}, already in the ledger {result['skipped']}, refused {result['refused']}")
    code = finish(ledger, args, [k for k, _ in batch])
    return code or (1 if result["refused"] else 0)


def cmd_resubmit(args) -> int:
    ledger = Ledger(args.ledger)
    states = tuple(s.strip() for s in args.states.split(",") if s.strip())
    keys = [j["key"] for j in ledger.jobs(states)]
    result = jobs.resubmit(ledger, backend_from(args), args.webhook, states, log=say, patience=args.patience)
    say(f"resubmitted {result['sent']}, refused {result['refused']}")
    code = finish(ledger, args, keys)
    return code or (1 if result["refused"] else 0)


def cmd_status(args) -> int:
    ledger = Ledger(args.ledger)
    rows = ledger.jobs()
    if args.json:
        say(json.dumps(rows, indent=1))
        return 0
    say(f"{'JOB':24} {'STATE':13} {'TRY':>3} {'FILES':>5} {'SECONDS':>8}  ERROR")
    for j in rows:
        files = sum(1 for p in j["outputs"] if p and Path(p).is_file())
        secs = j["timings"].get("predict_time")
        say(
            f"{j['key'][:24]:24} {j['state']:13} {j['attempt']:>3} {files:>5} "
            f"{'' if secs is None else f'{secs:.2f}':>8}  {(j['error'] or '')[:80]}"
        )
    counts = ledger.counts()
    say(f"{len(rows)} job(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ledger",
        type=Path,
        default=Settings().jobs_ledger,
        help="the SQLite ledger (default: $JOBS_LEDGER or jobs/ledger.sqlite)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("receive", help="run the webhook receiver")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 behind a proxy)")
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--out", type=Path, default=Settings().jobs_outputs, help="where images go: OUT/<job>/<index>.<ext>")
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="seconds a signed webhook's timestamp may be off (default %(default)s)",
    )
    p.set_defaults(func=cmd_receive)

    for name, func, helptext in (
        ("submit", cmd_submit, "send a JSONL batch"),
        ("resubmit", cmd_resubmit, "send failed, canceled or refused jobs again"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "submit":
            p.add_argument("file", type=Path, help="JSONL: one input object per line (or {id, input})")
        else:
            p.add_argument("--states", default="failed,canceled,submit_failed", help="which jobs (default %(default)s)")
        p.add_argument("--webhook", required=True, help="the receiver's URL, e.g. https://host.example/webhook")
        p.add_argument("--cog-url", help="a Cog server, e.g. http://localhost:5000")
        p.add_argument("--model", help="Replicate model owner/name[:version] (REPLICATE_API_TOKEN)")
        p.add_argument("--version", help="Replicate model version id")
        p.add_argument("--deployment", help="Replicate deployment owner/name")
        p.add_argument(
            "--patience",
            type=float,
            default=600,
            help="seconds to keep retrying while the server is busy or unreachable (default %(default)s)",
        )
        p.add_argument(
            "--wait",
            type=float,
            nargs="?",
            const=3600,
            default=None,
            metavar="SECONDS",
            help="wait until every job is done (exit 1 unless all succeeded)",
        )
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="the ledger: every job's state, files, timing and error")
    p.add_argument("--json", action="store_true", help="every field, as JSON")
    p.set_defaults(func=cmd_status)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (jobs.JobsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
