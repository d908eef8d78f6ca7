"""Summaries of load records: one row per concurrency level (throughput, latency and time-to-first-canvas
percentiles, share per backend, errors by gRPC code), written as CSV, and PNG plots (matplotlib)."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .harness import Record

PERCENTILES = (50, 90, 99)


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (NaN for no samples)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summarize(records: Sequence[Record], *, seconds: float | None = None) -> dict[str, Any]:
    """One level's row. ``seconds``: its wall time (default: first start to last end)."""
    if seconds is None:
        seconds = max((r.start_s + r.latency_s for r in records), default=0.0) - min(
            (r.start_s for r in records), default=0.0)
    ok = [r for r in records if r.code == "OK"]
    lat = [r.latency_s for r in ok]
    ttfc = [r.ttfc_s for r in ok if r.ttfc_s is not None]
    by_backend = Counter(r.backend for r in ok)
    codes = Counter(r.code for r in records if r.code != "OK")
    per_replica: dict[str, int] = {}
    for r in ok:
        if r.backend == "diffusion":
            per_replica[r.replica] = max(per_replica.get(r.replica, 0), r.replica_in_flight)
    row: dict[str, Any] = {
        "concurrency": records[0].level if records else 0,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "seconds": round(seconds, 3),
        "req_per_s": round(len(ok) / seconds, 3) if seconds > 0 else 0.0,
        "tok_per_s": round(sum(r.tokens for r in ok) / seconds, 2) if seconds > 0 else 0.0,
    }
    for q in PERCENTILES:
        row[f"p{q}_ms"] = round(pct(lat, q) * 1e3, 1)
    for q in PERCENTILES:
        row[f"ttfc_p{q}_ms"] = round(pct(ttfc, q) * 1e3, 1)
    for b in ("diffusion", "autoregressive"):
        row[f"share_{b}"] = round(by_backend.get(b, 0) / len(ok), 4) if ok else 0.0
    row["max_in_flight_per_replica"] = max(per_replica.values(), default=0)
    row["errors_by_code"] = ";".join(f"{c}={n}" for c, n in sorted(codes.items()))
    return row


def by_level(records: Iterable[Record]) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = {}
    for r in records:
        out.setdefault(r.level, []).append(r)
    return dict(sorted(out.items()))


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else []
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def write_records(path: Path, records: Sequence[Record]) -> Path:
    return write_csv(path, [dataclasses.asdict(r) for r in records])


def plot(rows: Sequence[dict[str, Any]], out_dir: Path, title: str = "dgserve load") -> list[Path]:
    """throughput.png, latency.png (p50/p90/p99 and time to first canvas), backends.png, errors.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    xs = [r["concurrency"] for r in rows]
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(xs, [r["req_per_s"] for r in rows], "o-", label="requests/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["tok_per_s"] for r in rows], "s--", color="tab:orange", label="tokens/s")
    ax.set(xscale="log", xlabel="concurrency", ylabel="requests/s", title=f"{title}: throughput")
    ax2.set_ylabel("tokens/s")
    ax.set_xticks(xs, [str(x) for x in xs])
    fig.legend(loc="upper left")
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for q, style in zip(PERCENTILES, ("o-", "s-", "^-")):
        ax.plot(xs, [r[f"p{q}_ms"] for r in rows], style, label=f"latency p{q}")
    if any(not math.isnan(r["ttfc_p50_ms"]) for r in rows):
        ax.plot(xs, [r["ttfc_p50_ms"] for r in rows], "o--", label="first canvas p50 (streams)")
        ax.plot(xs, [r["ttfc_p99_ms"] for r in rows], "^--", label="first canvas p99 (streams)")
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title=f"{title}: latency")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.legend()
    save(fig, "latency.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    d = [r["share_diffusion"] for r in rows]
    a = [r["share_autoregressive"] for r in rows]
    labels = [str(x) for x in xs]
    ax.bar(labels, d, label="diffusion")
    ax.bar(labels, a, bottom=d, label="autoregressive (overflow)")
    ax.set(xlabel="concurrency", ylabel="share of successful requests", ylim=(0, 1.05),
           title=f"{title}: backend share")
    ax.legend()
    save(fig, "backends.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    codes = sorted({c.split("=")[0] for r in rows for c in filter(None, r["errors_by_code"].split(";"))})
    bottom = [0.0] * len(rows)
    for code in codes:
        vals = []
        for r in rows:
            counts = dict(c.split("=") for c in filter(None, r["errors_by_code"].split(";")))
            vals.append(int(counts.get(code, 0)) / max(1, r["requests"]))
        ax.bar(labels, vals, bottom=bottom, label=code)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(xlabel="concurrency", ylabel="share of requests", title=f"{title}: errors by gRPC code")
    if codes:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    save(fig, "errors.png")
    return written
