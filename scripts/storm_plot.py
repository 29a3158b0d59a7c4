#!/usr/bin/env python3
"""Plots volumes unsealed over time from the timelines scripts/bench_storm.py writes: one
panel per storm shape, one line per build and run. Plain SVG, no plotting library.

Usage: scripts/storm_plot.py OUT_DIR [OUT_DIR/storm.svg]
"""
import csv
import json
import os
import sys

WIDTH, HEIGHT, MARGIN = 640, 300, 60
COLOURS = {"new": ["#1f77b4", "#4a98d0", "#7fb8e6"], "old": ["#d62728", "#e0605f", "#ec9a99"]}


def read_timeline(path):
    with open(path) as f:
        return [(float(row["seconds"]), int(row["unsealed"])) for row in csv.DictReader(f)]


def panel(title, lines, top):
    """An SVG group: axes, ticks and one polyline per (label, colour, points)."""
    x_max = max(max(p[0] for p in points) for _, _, points in lines) or 1.0
    y_max = max(max(p[1] for p in points) for _, _, points in lines) or 1
    w, h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def x(s):
        return MARGIN + w * s / x_max

    def y(n):
        return top + MARGIN + h - h * n / y_max

    out = [f'<text x="{WIDTH / 2}" y="{top + 25}" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<line x1="{MARGIN}" y1="{y(0)}" x2="{MARGIN + w}" y2="{y(0)}" stroke="black"/>',
           f'<line x1="{MARGIN}" y1="{y(0)}" x2="{MARGIN}" y2="{y(y_max)}" stroke="black"/>',
           f'<text x="{WIDTH / 2}" y="{y(0) + 35}" text-anchor="middle">seconds since every node started</text>',
           f'<text x="15" y="{(y(0) + y(y_max)) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 15 {(y(0) + y(y_max)) / 2})">volumes unsealed</text>']
    for i in range(6):
        s, n = x_max * i / 5, y_max * i / 5
        out.append(f'<text x="{x(s)}" y="{y(0) + 15}" text-anchor="middle" font-size="11">{s:.0f}</text>')
        out.append(f'<text x="{MARGIN - 5}" y="{y(n) + 4}" text-anchor="end" font-size="11">{n:.0f}</text>')
    for index, (label, colour, points) in enumerate(lines):
        path = " ".join(f"{x(s):.1f},{y(n):.1f}" for s, n in points)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        out.append(f'<text x="{MARGIN + w - 150}" y="{top + MARGIN + 15 * index + 5}" fill="{colour}" '
                   f'font-size="12">{label}</text>')
    return out


def main():
    out_dir = sys.argv[1]
    target = sys.argv[2] if len(sys.argv) > 2 else os.path.join(out_dir, "storm.svg")
    storms = [json.loads(line) for line in open(os.path.join(out_dir, "storm.jsonl"))]
    shapes = sorted({(s["nodes"], s["volumes"]) for s in storms}, reverse=True)
    body = []
    for index, (nodes, volumes) in enumerate(shapes):
        lines = []
        for storm in sorted((s for s in storms if (s["nodes"], s["volumes"]) == (nodes, volumes)),
                            key=lambda s: (s["build"], s["run"])):
            path = os.path.join(out_dir, storm["timeline"])
            if not os.path.exists(path):
                continue
            colours = COLOURS.get(storm["build"], ["#555555"])
            label = (f'{storm["build"]} run {storm["run"]}: '
                     f'{storm["time_to_all_unsealed_s"]:.1f} s')
            lines.append((label, colours[(storm["run"] - 1) % len(colours)], read_timeline(path)))
        if lines:
            body += panel(f"{nodes:,} nodes x {volumes} volumes", lines, index * HEIGHT)
    with open(target, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
                f'height="{HEIGHT * len(shapes)}" font-family="sans-serif" font-size="13">\n'
                f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")
    print(target)


if __name__ == "__main__":
    main()
