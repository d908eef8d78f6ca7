"""``dgserve loadtest --target HOST:PORT``: sweep concurrency against any deployment, write CSV and PNG plots."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"levels must be integers separated by commas, got {text!r}") from e
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be >= 1, got {text!r}")
    return levels


def register(sub: argparse._SubParsersAction) -> None:
    from dgserve.serving.cli import add_client_security_args

    p = sub.add_parser("loadtest", help="sweep concurrency against a running dgserve gRPC endpoint; CSV + PNG "
                       "(throughput, p50/p90/p99, time to first canvas, backend share, errors by code)")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="the dgserve gRPC endpoint")
    p.add_argument("--levels", type=_levels, default=[1, 2, 4, 8, 16, 32, 64],
                   help="concurrency levels, comma separated (default: 1,2,4,8,16,32,64)")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--requests-per-client", type=int, default=4,
                       help="requests per level = level x this (default: 4)")
    count.add_argument("--requests", type=int, help="requests per level, whatever the level")
    count.add_argument("--duration", type=float, help="seconds per level instead of a request count")
    p.add_argument("--mix", default="short=4,long=1,stream=2,diffusion=1",
                   help="request kinds and weights: short, long (unary, ANY), stream (GenerateStream, ANY), "
                        "diffusion (DIFFUSION_ONLY) (default: short=4,long=1,stream=2,diffusion=1)")
    p.add_argument("--short-tokens", type=int, default=16, help="max_new_tokens of short/stream/diffusion kinds")
    p.add_argument("--long-tokens", type=int, default=128, help="max_new_tokens of the long kind")
    p.add_argument("--steps", type=int, default=None, help="max_denoising_steps sent with every request "
                   "(default: the server's)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each request in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("loadtest-results"), help="output folder (default: "
                   "./loadtest-results): levels.csv, requests.csv, *.png, summary.json")
    p.add_argument("--no-plots", action="store_true", help="CSV only")
    client = p.add_argument_group("connection")
    add_client_security_args(client)
    p.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from dgserve.serving.cli import client_kwargs

    from .harness import Mix, Target, default_kinds, sweep
    from .report import by_level, plot, summarize, write_csv, write_records

    try:
        mix = Mix.parse(args.mix, default_kinds(args.short_tokens, args.long_tokens, args.steps))
        kw = client_kwargs(args)
    except (ValueError, OSError) as e:
        print(f"dgserve loadtest: {e}", file=sys.stderr)
        return 2
    target = Target(args.target, credentials=kw.get("credentials"), token=kw.get("token"),
                    server_name=kw.get("server_name"), timeout_s=args.timeout)
    rows: list[dict[str, Any]] = []

    def on_level(c: int, recs: list) -> None:
        row = summarize(recs)
        rows.append(row)
        print(f"c={c:>4} n={row['requests']:>5} ok={row['ok']:>5} {row['req_per_s']:8.2f} req/s "
              f"p50={row['p50_ms']:.0f} p90={row['p90_ms']:.0f} p99={row['p99_ms']:.0f} ms "
              f"ttfc_p50={row['ttfc_p50_ms']:.0f} ms diffusion={row['share_diffusion']:.0%} "
              f"errors={row['errors_by_code'] or '-'}", flush=True)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    records = sweep(target, args.levels, mix, requests_per_level=args.requests,
                    requests_per_client=None if (args.requests or args.duration) else args.requests_per_client,
                    duration_s=args.duration, seed=args.seed, on_level=on_level)
    out: Path = args.out
    write_csv(out / "levels.csv", rows)
    write_records(out / "requests.csv", records)
    assert [r["requests"] for r in rows] == [len(v) for v in by_level(records).values()]
    summary = {"target": args.target, "started": started, "client_machine": f"{platform.node()} "
               f"{platform.machine()}", "mix": args.mix, "levels": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_plots:
        plot(rows, out, title=f"dgserve {args.target}")
    print(f"dgserve loadtest: wrote {out}/levels.csv, requests.csv, summary.json"
          + ("" if args.no_plots else ", throughput.png, latency.png, backends.png, errors.png"))
    return 0
