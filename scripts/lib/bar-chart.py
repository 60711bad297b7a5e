#!/usr/bin/env python3
"""The nodes chart of docs/performance.md: req/s through Envoy with and without the
limiter, by number of nodes, as one SVG bar chart.

    scripts/lib/bar-chart.py docs/bench/nodes.json docs/bench/nodes.svg
"""
import json
import math
import sys


def nice_step(top, ticks=5):
    """A round tick step (1, 2, 2.5 or 5 × 10^k) so that about `ticks` steps reach `top`."""
    raw = top / ticks
    k = 10 ** math.floor(math.log10(raw))
    return next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= raw)


def main(src, out):
    data = json.load(open(src))
    W, H, L, B, T = 600, 340, 70, 50, 70
    step = nice_step(max(max(d["envoy_only_rps"], d["full_rps"]) for d in data))
    top = step * math.ceil(max(max(d["envoy_only_rps"], d["full_rps"]) for d in data) / step)

    def y(v):
        return H - B - (H - B - T) * v / top

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">req/s through Envoy by number of nodes (all on the same 2 cores)</text>',
           f'<rect x="{L}" y="32" width="12" height="12" fill="#9ab"/><text x="{L + 16}" y="42">Envoy only (no limiter)</text>',
           f'<rect x="{L + 190}" y="32" width="12" height="12" fill="#d62"/><text x="{L + 206}" y="42">full wiring (ext_authz + ext_proc + Redis)</text>']
    v = 0
    while v <= top + 1e-9:
        svg.append(f'<line x1="{L}" y1="{y(v):.0f}" x2="{W - 20}" y2="{y(v):.0f}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{y(v) + 4:.0f}" text-anchor="end">{v:,.0f}</text>')
        v += step
    svg.append(f'<line x1="{L}" y1="{H - B}" x2="{W - 20}" y2="{H - B}" stroke="#333"/>')
    slot = (W - 20 - L) / len(data)
    for i, d in enumerate(data):
        x0, bw = L + slot * i + slot * 0.15, slot * 0.35
        for j, (val, colour) in enumerate(((d["envoy_only_rps"], "#9ab"), (d["full_rps"], "#d62"))):
            svg.append(f'<rect x="{x0 + j * bw:.0f}" y="{y(val):.0f}" width="{bw - 4:.0f}" height="{H - B - y(val):.0f}" fill="{colour}"/>'
                       f'<text x="{x0 + j * bw + bw / 2 - 2:.0f}" y="{y(val) - 4:.0f}" text-anchor="middle" font-size="11">{val:,.0f}</text>')
        n = d["nodes"]
        svg.append(f'<text x="{x0 + bw:.0f}" y="{H - B + 18}" text-anchor="middle">{n} node{"s" if n > 1 else ""} '
                   f'(ratio {d["full_rps"] / d["envoy_only_rps"]:.2f})</text>')
    svg.append("</svg>")
    open(out, "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
