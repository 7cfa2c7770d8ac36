"""A bench report: its JSON (schema ``layerfs-bench/1``), the text table, the HTML page with
charts, and two reports side by side (``--compare``).

A figure's ratio against a reference is a slowdown: how many times the reference's speed
the system is slower (time / reference time, or reference MB/s / MB/s), so above 1 is
slower whatever the unit.  The charts are drawn with matplotlib (the ``layerfs[bench]``
extra) through its object API, no pyplot state: without it, ``write_html`` says so and the
JSON and text table are all there is.  Stateless, thread-safe.
"""

from __future__ import annotations

import html
import io
import json
import math
from typing import Any

from layerfs.storagebench.run import SCHEMA
from layerfs.storagebench.systems import SYSTEMS

REFERENCES = {"native": "the directory itself (native)", "overlay": "the kernel overlay"}
SHORT = {
    "native": "native",
    "overlay": "overlay",
    "fuse-overlayfs": "fuse-ovl",
    "layerfs": "layerfs",
    "layerfs-py": "lfs-py",
}


class ReportError(ValueError):
    """One line for the user."""


def load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ReportError(f"{path} is not JSON") from None
    found = report.get("schema") if isinstance(report, dict) else None
    if not isinstance(found, str) or not found.startswith("layerfs-bench/"):
        raise ReportError(f"{path} is not a layerfs bench report")
    if found != SCHEMA:
        raise ReportError(f"{path} is a bench report of schema {found}; this layerfs reads {SCHEMA}")
    return report


def value(report: dict[str, Any], workload: str, system: str) -> float | None:
    res = report["results"].get(workload, {}).get(system, {})
    v = res.get("value")
    return float(v) if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) else None


def slowdown(report: dict[str, Any], workload: str, system: str, reference: str) -> float | None:
    """How many times slower ``system`` was than ``reference`` (below 1: faster)."""
    v, r = value(report, workload, system), value(report, workload, reference)
    if v is None or r is None:
        return None
    return r / v if report["workloads"][workload]["better"] == "higher" else v / r


def systems_of(report: dict[str, Any]) -> list[str]:
    order = report.get("order", {}).get("systems") or list(SYSTEMS)
    return [s for s in order if s in report["systems"]] + [s for s in report["systems"] if s not in order]


def workloads_of(report: dict[str, Any]) -> list[str]:
    """In the order they ran (a JSON object's keys may come back sorted)."""
    order = report.get("order", {}).get("workloads") or []
    return [w for w in order if w in report["workloads"]] + [w for w in report["workloads"] if w not in order]


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"


def cell_text(report: dict[str, Any], workload: str, system: str) -> str:
    res = report["results"].get(workload, {}).get(system, {})
    if "skipped" in res:
        return "skipped"
    if "failed" in res:
        return "FAILED"
    return fmt(value(report, workload, system), report["workloads"][workload]["unit"])


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def text(report: dict[str, Any]) -> str:
    """The figures, the ratios against the kernel overlay, and why anything is missing."""
    systems = systems_of(report)
    m, d = report["machine"], report["disk"]
    out = [
        f"layerfs bench ({report['mode']}, {report['rounds']} round(s), median) on {d['path']}: "
        f"{d.get('device', '?')} {d.get('fstype', '?')}; {m['board']}, {m['cpu']['model']}; "
        f"{report['elapsed_s']} s",
        f"cold: {report['cold']}",
        "",
    ]
    rows = [
        [w["label"][:58] + f" [{w['unit']}]"] + [cell_text(report, name, s) for s in systems]
        for name, w in ((n, report["workloads"][n]) for n in workloads_of(report))
    ]
    out.append(_table(rows, ["workload"] + [SHORT.get(s, s) for s in systems]))
    for ref in REFERENCES:
        if ref not in systems:
            continue
        out += ["", f"times slower than {REFERENCES[ref]} (below 1: faster)"]
        others = [s for s in systems if s != ref]
        rows = []
        for name in workloads_of(report):
            w = report["workloads"][name]
            ratios = [slowdown(report, name, s, ref) for s in others]
            rows.append([w["label"][:58]] + [f"{r:.2f}" if r is not None else "-" for r in ratios])
        out.append(_table(rows, ["workload"] + [SHORT.get(s, s) for s in others]))
    notes = _notes(report)
    if notes:
        out += ["", *notes]
    thr = report["throttling"]
    if isinstance(thr, dict) and not thr.get("ok", True):
        out.append(f"WARNING: throttling seen during the run: {', '.join(thr['seen_during_run'])}")
    return "\n".join(out) + "\n"


def _notes(report: dict[str, Any]) -> list[str]:
    notes = []
    for s, info in report["systems"].items():
        if info.get("skipped"):
            notes.append(f"{s}: skipped: {info['skipped']}")
    for name, per in report["results"].items():
        for s, res in per.items():
            if "failed" in res:
                notes.append(f"{name} on {s}: failed: {res['failed']}")
            elif "skipped" in res and not report["systems"].get(s, {}).get("skipped"):
                notes.append(f"{name} on {s}: skipped: {res['skipped']}")
    return notes


# -- charts -------------------------------------------------------------------------------------------
COLORS = {
    "native": "#4d4d4d",
    "overlay": "#1f77b4",
    "fuse-overlayfs": "#ff7f0e",
    "layerfs": "#2ca02c",
    "layerfs-py": "#98df8a",
}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _bars(ax: Any, labels: list[str], series: dict[str, list[float | None]], title: str, xlabel: str) -> None:
    """Grouped horizontal bars on a log scale around 1 (the reference)."""
    n = max(1, len(series))
    height = 0.8 / n
    ys = list(range(len(labels)))
    for k, (name, values) in enumerate(series.items()):
        pos = [y + (k - (n - 1) / 2) * height for y in ys]
        vals = [v if v is not None else math.nan for v in values]
        bars = ax.barh(
            pos,
            [v - 1 if v == v else 0 for v in vals],
            left=1,
            height=height,
            color=COLORS.get(name, None),
            label=name,
        )
        for b, v in zip(bars, vals):
            if v == v:  # the figure at the bar's end, outside it
                y = b.get_y() + b.get_height() / 2
                if v >= 1:
                    ax.text(v * 1.04, y, f"{v:.2f}", va="center", ha="left", fontsize=7)
                else:
                    ax.text(v / 1.04, y, f"{v:.2f}", va="center", ha="right", fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1, color="black", linewidth=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # the first workload on top (idempotent on shared axes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", which="both", linewidth=0.3, alpha=0.5)
    # below the chart: inside, it would cover the last workload's bars
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=n, frameon=False)
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, 0.5) / 1.6, max(hi, 2) * 1.6)


def ratio_figure(report: dict[str, Any]) -> Any:
    """One figure: each system against native, and against the kernel overlay."""
    from matplotlib.figure import Figure

    systems = systems_of(report)
    names = workloads_of(report)
    labels = [report["workloads"][n]["label"] for n in names]
    refs = [r for r in REFERENCES if r in systems]
    fig = Figure(figsize=(7.5 * max(1, len(refs)), 0.5 * len(names) + 2.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(refs)), sharey=True, squeeze=False)[0]
    for ax, ref in zip(axes, refs):
        series = {s: [slowdown(report, n, s, ref) for n in names] for s in systems if s != ref}
        _bars(ax, labels, series, f"against {REFERENCES[ref]}", "times slower (log scale; below 1: faster)")
    d, m = report["disk"], report["machine"]
    fig.suptitle(
        f"layerfs bench: {d.get('device', '?')} ({d.get('fstype', '?')}) on {m['board'] if m['board'] != 'unknown' else m['cpu']['model']}",
        fontsize=11,
    )
    return fig


def compare_figure(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> Any:
    from matplotlib.figure import Figure

    systems = [s for s in systems_of(a) if s in b["systems"]]
    wl = [w for w in workloads_of(a) if w in b["workloads"]]
    labels = [a["workloads"][w]["label"] for w in wl]
    fig = Figure(figsize=(8, 0.5 * len(wl) + 2.2), layout="constrained")
    ax = fig.subplots()
    series: dict[str, list[float | None]] = {}
    for s in systems:
        series[s] = [_compare_ratio(a, b, w, s) for w in wl]
    _bars(
        ax,
        labels,
        series,
        f"{names[1]} against {names[0]}",
        f"times slower on {names[1]} (log scale; below 1: faster)",
    )
    return fig


def _compare_ratio(a: dict[str, Any], b: dict[str, Any], workload: str, system: str) -> float | None:
    va, vb = value(a, workload, system), value(b, workload, system)
    if va is None or vb is None:
        return None
    return va / vb if a["workloads"][workload]["better"] == "higher" else vb / va


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]


def _png(fig: Any, path: str) -> None:
    fig.savefig(path, format="png", dpi=110)


# -- HTML -----------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
td.skip { color: #888; font-style: italic; text-align: left; font-size: 0.85em; }
td.fail { color: #b00; text-align: left; font-size: 0.85em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; font-size: 0.9em; }
dt { font-weight: 600; }
.warn { color: #b00; font-weight: 600; }
small { color: #666; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _machine_dl(report: dict[str, Any]) -> str:
    m, d = report["machine"], report["disk"]
    block = d.get("block")
    disk = (
        f"{block['disk']}: {block['model']} ({block['type']}, "
        + (
            "rotational"
            if block["rotational"] is True
            else "not rotational"
            if block["rotational"] is False
            else "rotational: unknown"
        )
        + ")"
        if isinstance(block, dict)
        else str(block or "unknown")
    )
    thr = report["throttling"]
    if isinstance(thr, dict):
        thr_text = (
            "none seen" if thr["ok"] else f"<span class=warn>{_e(', '.join(thr['seen_during_run']))}</span>"
        )
        thr_text += f" <small>({_e(thr['source'])}: {_e(thr['before'])} → {_e(thr['after'])})</small>"
    else:
        thr_text = _e(thr)
    mem = m["memory"]["total_bytes"]
    items = [
        ("board", _e(m["board"])),
        ("CPU", _e(f"{m['cpu']['model']} × {m['cpu']['count']}, governor {m['cpu']['governor']}")),
        ("memory", _e(f"{mem / 2**30:.1f} GiB" if isinstance(mem, int) else mem)),
        ("kernel", _e(m["kernel"])),
        ("Python", _e(f"{m['python']['version']} ({m['python']['arch']}, {m['python']['bits']}-bit)")),
        ("directory", _e(d["path"])),
        ("filesystem", _e(f"{d.get('device')} {d.get('fstype')} ({d.get('mount_options')})")),
        ("disk", _e(disk)),
        ("throttling", thr_text),
        ("temperature", _e(f"{report['temperature_c']['before']} → {report['temperature_c']['after']} °C")),
        ("layerfs", _e(f"{report['layerfs']['version']} (tar parser: {report['layerfs']['tar_parser']})")),
        ("fio", _e(report["tools"]["fio"])),
        ("image", _e(", ".join(f"{k}: {v}" for k, v in report["image"].items()))),
        (
            "run",
            _e(
                f"{report['created']}, {report['mode']}, {report['rounds']} round(s), {report['elapsed_s']} s"
            ),
        ),
        ("cold", _e(report["cold"])),
    ]
    return "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _results_table(report: dict[str, Any]) -> str:
    systems = systems_of(report)
    head = "<tr><th>workload</th><th>unit</th>" + "".join(f"<th>{_e(s)}</th>" for s in systems) + "</tr>"
    rows = []
    for name in workloads_of(report):
        w = report["workloads"][name]
        cells = []
        for s in systems:
            res = report["results"].get(name, {}).get(s, {})
            if "skipped" in res:
                cells.append(f"<td class=skip>skipped: {_e(res['skipped'])}</td>")
            elif "failed" in res:
                cells.append(f"<td class=fail>failed: {_e(res['failed'])}</td>")
            else:
                rounds = ", ".join(f"{v:.4g}" for v in res.get("values", []))
                v = value(report, name, s)
                cells.append(f"<td>{_e(fmt(v, w['unit']))}<br><small>{_e(rounds)}</small></td>")
        rows.append(f"<tr><td>{_e(w['label'])}</td><td>{_e(w['unit'])}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def html_page(report: dict[str, Any], chart_svg: str | None) -> str:
    systems = "".join(
        f"<li><b>{_e(s)}</b>: {_e(info['label'])}"
        + (f" — <i>skipped: {_e(info['skipped'])}</i>" if info.get("skipped") else "")
        + (f" <small>({_e(info['version'])})</small>" if info.get("version") else "")
        + "</li>"
        for s, info in ((s, report["systems"][s]) for s in systems_of(report))
    )
    chart = (
        chart_svg or "<p><i>No charts: matplotlib is not installed (pip install 'layerfs[bench]').</i></p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>layerfs bench: {_e(report["disk"]["path"])}</title>
<style>{CSS}</style></head><body>
<h1>layerfs bench</h1>
{_machine_dl(report)}
<h2>Against the directory itself and the kernel overlay</h2>
<p>Each bar: how many times slower than the reference this system was on that workload (the median of the
rounds; below 1: faster). Times and throughputs alike; every figure was measured in this one run.</p>
{chart}
<h2>Systems</h2><ul>{systems}</ul>
<h2>Figures</h2>
<p>The median, with every round below it. Seconds: lower is better; MB/s: higher is better.</p>
{_results_table(report)}
</body></html>
"""


def write_html(report: dict[str, Any], path: str, png: str | None = None) -> bool:
    """The report's page at ``path`` (and its chart as ``png``); False if matplotlib is missing
    (the page then has the tables only)."""
    svg = None
    drawn = have_matplotlib()
    if drawn:
        fig = ratio_figure(report)
        svg = _svg(fig)
        if png:
            _png(fig, png)
    with open(path, "w") as f:
        f.write(html_page(report, svg))
    return drawn


# -- two reports --------------------------------------------------------------------------------------------
def _disk_name(report: dict[str, Any]) -> str:
    d = report["disk"]
    return f"{d.get('device', '?')} {d.get('fstype', '?')}"


def _label(report: dict[str, Any], path: str) -> str:
    d = report["disk"]
    return f"{path}: {d.get('device', '?')} {d.get('fstype', '?')}"


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for w in workloads_of(a):
        info = a["workloads"][w]
        if w not in b["workloads"]:
            continue
        for s in systems_of(a):
            if s not in b["systems"]:
                continue
            out.append(
                {
                    "workload": w,
                    "label": info["label"],
                    "unit": info["unit"],
                    "system": s,
                    "a": value(a, w, s),
                    "b": value(b, w, s),
                    "b_slowdown": _compare_ratio(a, b, w, s),
                }
            )
    return out


def compare_text(a: dict[str, Any], b: dict[str, Any], paths: tuple[str, str]) -> str:
    rows = []
    for r in compare_rows(a, b):
        ratio = r["b_slowdown"]
        rows.append(
            [
                f"{r['label'][:50]}",
                SHORT.get(r["system"], r["system"]),
                fmt(r["a"], r["unit"]),
                fmt(r["b"], r["unit"]),
                f"{ratio:.2f}" if ratio is not None else "-",
            ]
        )
    head = [f"A = {_label(a, paths[0])}", f"B = {_label(b, paths[1])}", ""]
    return "\n".join(head) + _table(rows, ["workload", "system", "A", "B", "B slower x"]) + "\n"


def write_compare_html(a: dict[str, Any], b: dict[str, Any], paths: tuple[str, str], out: str) -> bool:
    drawn = have_matplotlib()
    chart = "<p><i>No chart: matplotlib is not installed (pip install 'layerfs[bench]').</i></p>"
    if drawn:
        chart = _svg(compare_figure(a, b, (f"A ({_disk_name(a)})", f"B ({_disk_name(b)})")))
    rows = "".join(
        f"<tr><td>{_e(r['label'])}</td><td>{_e(r['system'])}</td><td>{_e(fmt(r['a'], r['unit']))}</td>"
        f"<td>{_e(fmt(r['b'], r['unit']))}</td><td>{_ratio_text(r['b_slowdown'])}</td></tr>"
        for r in compare_rows(a, b)
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>layerfs bench: two runs</title><style>{CSS}</style></head><body>
<h1>layerfs bench: two runs side by side</h1>
<h2>A: {_e(_label(a, paths[0]))}</h2>{_machine_dl(a)}
<h2>B: {_e(_label(b, paths[1]))}</h2>{_machine_dl(b)}
<h2>B against A</h2><p>Each bar: how many times slower B was than A for that system and workload (below 1: B was faster).</p>
{chart}
<table><tr><th>workload</th><th>system</th><th>A</th><th>B</th><th>B slower ×</th></tr>{rows}</table>
</body></html>
"""
    with open(out, "w") as f:
        f.write(page)
    return drawn


def _ratio_text(r: float | None) -> str:
    return f"{r:.2f}" if r is not None else "-"
