#!/usr/bin/env python3
"""Plots throughput and p99 latency against concurrency and offered load from `bench`
JSON lines (as scripts/bench_suite.py writes them).

Usage: scripts/bench_plot.py RESULTS.jsonl OUT_DIR   (needs matplotlib: pip install matplotlib)
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path, out_dir):
    records = [json.loads(line) for line in open(results_path) if line.strip()]
    for experiment, x_key, x_label, name in (
        ("sweep-concurrency", "concurrency", "concurrency (calls in flight)", "unseal-vs-concurrency.png"),
        ("sweep-rate", "offered_rate", "offered load (unseals started per second)", "unseal-vs-offered-load.png"),
    ):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
        for connection, style in (("fresh", "o-"), ("shared", "s--")):
            rows = sorted((r for r in records if r.get("experiment") == experiment and r["connection"] == connection),
                          key=lambda r: r[x_key])
            if not rows:
                continue
            xs = [r[x_key] for r in rows]
            top.plot(xs, [r["calls_per_s"] for r in rows], style, label=f"{connection} connection per call"
                     if connection == "fresh" else "one shared connection")
            bottom.plot(xs, [r["latency"]["p99_us"] / 1000 for r in rows], style, label=connection)
        top.set_ylabel("unseals per second")
        bottom.set_ylabel("p99 latency (ms)")
        bottom.set_xlabel(x_label)
        for axis in (top, bottom):
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.grid(True, which="both", alpha=0.3)
        top.legend()
        fig.suptitle(f"talos-kms-server unseal, {x_label}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        print(f"wrote {os.path.join(out_dir, name)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
