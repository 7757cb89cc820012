"""PNG plots of a results file, written next to it: ``NAME_latency_cdf.png`` and
``NAME_throughput.png`` for ``perf/results/NAME.json``.

What is plotted is found in the figures, not configured per benchmark:

- **latency CDF**: every dict under a key ending in ``_us`` / ``_ns`` / ``_ms`` with at least
  two percentile keys (``p50``, ``p99``, ``p99.9``; ``max`` is left out, a CDF cannot place
  it), or with a ``samples`` list of values (then the empirical CDF), is one curve; the
  percentile axis is a logit scale, so the tail gets as much room as the median.
- **throughput against N**: every dict whose keys are all counts (``"1"``, ``"10"``,
  ``"100"``, or ``"1_matcher"``, ``"2_matcher"``), and every list of dicts that each hold an
  integer ``n`` (a panel per value of a second key such as ``k`` that makes an N x K grid with
  it), is a series over N; every ``*_per_s`` figure that at least two of its entries hold is
  a line, and ``*_per_s`` figures outside any series (the baselines of the same run) are
  drawn as dashed reference lines.

Nothing else inside a list is plotted (the rounds of a figure; the latencies of a list of
cells). A results file without latency data gets no CDF, one without a series no throughput
plot (and a PNG left from an earlier run of either is removed).

A scenario may also draw plots of its own from its results file (the connect and storm curves
of ``connections``, the three claims of ``hosts``, p99 and RSS over time of ``soak``): a
top-level function ``draw(results: Path) -> list[Path]`` in ``bench_NAME.py`` beside this file,
which writes its PNGs next to ``NAME.json`` and returns their paths. ``plot_results`` finds it
by reading the script (one without a ``draw`` is never imported) and calls it after the plots
above, so a benchmark's own plots are drawn again from a results file as the others are.

Needs matplotlib (``pip install -e '.[bench]'``); without it ``PlotsUnavailable`` says so.

Run: ``.venv/bin/python perf/plots.py perf/results/pub.json ...`` (``zmx bench`` calls
``plot_results`` after a benchmark and in ``zmx bench plot``).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
TO_MS = {"_ns": 1e-6, "_us": 1e-3, "_ms": 1.0}
COUNT_KEY = re.compile(r"(\d+)(?:_([a-z]+))?")
MAX_SAMPLES_DRAWN = 400
SIZE_INCHES = (6.4, 3.8)  # per panel
DPI = 90


class PlotsUnavailable(RuntimeError):
    """matplotlib is missing: the figures are in the results file, only the pictures are not."""


NO_MATPLOTLIB = ("matplotlib is not installed, so no plots were drawn (the results file has every figure): "
                 "pip install -e '.[bench]' (or pip install 'matplotlib>=3.7')")


@dataclass
class Curve:
    label: str
    points: list[tuple[float, float]]  # (x, y): (latency ms, fraction) or (N, per second)


@dataclass
class Panel:
    """A series over N: one line per figure, the baselines as reference lines."""

    title: str
    n_label: str
    lines: list[Curve] = field(default_factory=list)
    references: list[tuple[str, float]] = field(default_factory=list)


def _unit(key: str) -> float | None:
    for suffix, factor in TO_MS.items():
        if key.endswith(suffix):
            return factor
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _distribution(value: dict[str, Any], factor: float) -> list[tuple[float, float]]:
    """(latency ms, fraction at or below) of a percentile dict, or of its ``samples`` list."""
    samples = value.get("samples")
    if isinstance(samples, list) and len(samples) >= 2 and all(_is_number(s) for s in samples):
        ordered = sorted(samples)
        n = len(ordered)
        ranks = sorted({min(n - 1, int(n * (1 - 10 ** (-4 * i / MAX_SAMPLES_DRAWN))))
                        for i in range(MAX_SAMPLES_DRAWN)})  # denser towards the tail
        return [(ordered[r] * factor, (r + 0.5) / n) for r in ranks if ordered[r] > 0]
    points = []
    for key, x in value.items():
        match = PERCENTILE.fullmatch(key)
        if match and _is_number(x) and x > 0 and 0 < float(match[1]) < 100:
            points.append((x * factor, float(match[1]) / 100))
    return sorted(points, key=lambda p: p[1]) if len(points) >= 2 else []


def _walk(data: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str, Any]]:
    """(path, key, value) of every item of nested dicts; lists are not entered."""
    for key, value in data.items():
        yield path, key, value
        if isinstance(value, dict):
            yield from _walk(value, (*path, key))


def _part(path: tuple[str, ...], i: int) -> str:
    """``path[i]`` for a label: a count under ``symbol_counts`` reads ``10 symbols``."""
    part = path[i]
    if part.isdigit() and i and path[i - 1].endswith("_counts"):
        return f"{part} {path[i - 1].removesuffix('_counts')}{'' if part == '1' else 's'}"
    return part


def _labels(paths: list[tuple[str, ...]]) -> list[str]:
    """Short labels: the parts every path shares are left out, ``_per_s`` read as ``/s``."""
    shared = set.intersection(*(set(p) for p in paths)) if len(paths) > 1 else set()
    labels = []
    for p in paths:
        label = " ".join(_part(p, i) for i in range(len(p)) if p[i] not in shared) or " ".join(p)
        labels.append(label.replace("_per_s", "/s").replace("_", " "))
    return labels


def latency_curves(data: dict[str, Any]) -> list[Curve]:
    found = []
    for path, key, value in _walk(data):
        factor = _unit(key)
        if factor is None or not isinstance(value, dict):
            continue
        points = _distribution(value, factor)
        if points:
            found.append(((*path, key[:-3]), points))
    return [Curve(label, points) for label, (_, points) in zip(_labels([p for p, _ in found]), found, strict=True)]


def _count(key: str) -> tuple[int, str] | None:
    match = COUNT_KEY.fullmatch(key)
    return (int(match[1]), match[2] or "") if match else None


def _is_series(value: Any) -> bool:
    if not isinstance(value, dict) or len(value) < 2 or not all(isinstance(v, dict) for v in value.values()):
        return False
    counts = [_count(k) for k in value]
    return all(c is not None for c in counts) and len({c[1] for c in counts if c is not None}) == 1


def _rates(data: dict[str, Any]) -> Iterator[tuple[tuple[str, ...], float]]:
    """(path, value) of every ``*_per_s`` number, not inside lists."""
    for path, key, value in _walk(data):
        if key.endswith("_per_s") and _is_number(value):
            yield (*path, key), value


def _grid_key(entries: list[dict[str, Any]]) -> str | None:
    """The key besides ``n`` that, with ``n``, makes a full grid of the entries (``k`` of N x K
    cells), so each of its values gets a panel of its own; None when there is none."""
    ns = {e["n"] for e in entries}
    for key, first in entries[0].items():
        if key == "n" or not isinstance(first, int) or isinstance(first, bool):
            continue
        values = {e.get(key) for e in entries}
        pairs = {(e["n"], e.get(key)) for e in entries}
        if 1 < len(values) and len(pairs) == len(entries) == len(ns) * len(values):
            return key
    return None


def _panel(title: str, n_label: str, entries: list[tuple[int, dict[str, Any]]]) -> Panel | None:
    """A line for each ``*_per_s`` figure that at least two of the (N, entry) hold."""
    by_figure: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for n, entry in entries:
        for figure, rate in _rates(entry):
            by_figure.setdefault(figure, []).append((n, rate))
    figures = [(f, sorted(p)) for f, p in by_figure.items() if len(p) >= 2]
    if not figures:
        return None
    labels = _labels([f for f, _ in figures])
    return Panel(title, n_label, [Curve(label, points) for label, (_, points) in zip(labels, figures, strict=True)])


def throughput_panels(data: dict[str, Any]) -> list[Panel]:
    """Series over N: dicts keyed by counts, and lists of entries with an integer ``n``."""
    panels: list[Panel | None] = []
    series_paths = []
    for path, key, value in _walk(data):
        title = " ".join((*path, key)).replace("_", " ")
        if _is_series(value):
            series_paths.append((*path, key))
            counts = {k: c for k in value if (c := _count(k)) is not None}
            unit = next(iter(counts.values()))[1]
            n_label = f"{unit}s" if unit else key.removesuffix("_counts").removesuffix("_count").replace("_", " ") + "s"
            panels.append(_panel(title, n_label, [(counts[k][0], entry) for k, entry in value.items()]))
        elif (isinstance(value, list) and len(value) >= 2 and all(isinstance(e, dict) for e in value)
              and all(isinstance(e.get("n"), int) for e in value)):
            series_paths.append((*path, key))
            grid = _grid_key(value)
            groups = sorted({e[grid] for e in value}) if grid else [None]
            for g in groups:
                entries = [(e["n"], e) for e in value if grid is None or e[grid] == g]
                panels.append(_panel(title if grid is None else f"{title}, {grid} = {g}", "n", entries))
    found = [p for p in panels if p is not None]
    references = [(p, v) for p, v in _rates(data) if not any(p[:len(s)] == s for s in series_paths)]
    if found and references:
        labels = _labels([p for p, _ in references])
        for panel in found:
            panel.references = [(label, v) for label, (_, v) in zip(labels, references, strict=True)]
    return found


# -- drawing ---------------------------------------------------------------------------------------


def _figure(panels: int) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(NO_MATPLOTLIB) from None
    return Figure(figsize=(SIZE_INCHES[0], SIZE_INCHES[1] * panels), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    """A palette PNG (Pillow comes with matplotlib): a third of the size of the RGBA one."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=128).save(path, format="PNG", optimize=True)


def _style(i: int) -> dict[str, Any]:
    """Colour and line style of curve ``i``: ten colours, then the same with dashes."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[i // 10 % 3]}


def _plain_numbers(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:,.10g}"))


def draw_latency_cdf(curves: list[Curve], title: str, path: Path) -> None:
    fig = _figure(1)  # first: it says so when matplotlib is missing
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax = fig.add_subplot()
    for i, curve in enumerate(curves):
        xs, ys = zip(*curve.points, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, linewidth=1.2, label=curve.label,
                **_style(i))
    fractions = [y for c in curves for _, y in c.points]
    ax.set_xscale("log")
    ax.set_yscale("logit")
    ax.set_ylim(min(0.25, min(fractions)), 1 - (1 - max(fractions)) / 3)
    ticks = [t for t in (0.25, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999) if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"p{t * 100:g}" for t in ticks])
    _plain_numbers(ax.xaxis)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction at or below")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    fig.legend(fontsize=6, loc="outside right upper")
    _save(fig, path)


def draw_throughput(panels: list[Panel], title: str, path: Path) -> None:
    fig = _figure(len(panels))  # first: it says so when matplotlib is missing
    from matplotlib.ticker import NullLocator

    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        ns = sorted({x for c in panel.lines for x, _ in c.points})
        values = [y for c in panel.lines for _, y in c.points] + [v for _, v in panel.references]
        for i, curve in enumerate(panel.lines):
            xs, ys = zip(*curve.points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.2, label=curve.label, **_style(i))
        for i, (label, value) in enumerate(panel.references, len(panel.lines)):
            ax.axhline(value, linestyle="--", linewidth=0.9, color=f"C{i % 10}", label=f"{label} (baseline)")
        if ns[-1] / max(ns[0], 1) >= 10:
            ax.set_xscale("log")
        if max(values) / max(min(values), 1e-9) >= 10:
            ax.set_yscale("log")
        ax.set_xticks(ns, [f"{n:,}" for n in ns])
        ax.xaxis.set_minor_locator(NullLocator())
        _plain_numbers(ax.yaxis)
        ax.set_xlabel(panel.n_label)
        ax.set_ylabel("per second")
        ax.set_title(f"{title}: {panel.title}", fontsize=10)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    _save(fig, path)


def scenario_draw(results: Path) -> Callable[[Path], list[Path]] | None:
    """``draw`` of the scenario behind ``results`` (``bench_NAME.py`` beside this file for
    ``NAME.json``), if the script defines one at top level; ``None`` otherwise. The script is
    read first and imported only if it has one (its other code runs only under ``__main__``)."""
    script = Path(__file__).with_name(f"bench_{results.stem}.py")
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "draw" for node in tree.body):
        return None
    name = script.stem
    module = sys.modules.get(name)
    if module is None or Path(getattr(module, "__file__", None) or "").resolve() != script.resolve():
        if str(script.parent) not in sys.path:  # the scripts import each other and _common
            sys.path.insert(0, str(script.parent))
        spec = importlib.util.spec_from_file_location(name, script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    draw: Callable[[Path], list[Path]] = module.draw
    return draw


def plot_results(results: Path) -> list[Path]:
    """Draw the plots of a results file next to it, the scenario's own (``scenario_draw``) after
    the latency CDF and the throughput plot; the paths written (none: nothing to plot)."""
    data = json.loads(results.read_text(encoding="utf-8"))
    name = results.stem
    title = f"{data.get('benchmark', name)} ({data.get('timestamp', 'no timestamp')})"
    written = []
    curves = latency_curves(data)
    panels = throughput_panels(data)
    cdf, throughput = results.with_name(f"{name}_latency_cdf.png"), results.with_name(f"{name}_throughput.png")
    if curves:
        draw_latency_cdf(curves, title, cdf)
        written.append(cdf)
    else:
        cdf.unlink(missing_ok=True)
    if panels:
        draw_throughput(panels, title, throughput)
        written.append(throughput)
    else:
        throughput.unlink(missing_ok=True)
    draw = scenario_draw(results)
    if draw is not None:
        try:
            written += draw(results)
        except ImportError as e:
            if (e.name or "").partition(".")[0] not in ("matplotlib", "PIL"):
                raise
            raise PlotsUnavailable(NO_MATPLOTLIB) from None
    return written


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: plots.py RESULTS.json ...", file=sys.stderr)
        return 2
    for arg in argv:
        try:
            written = plot_results(Path(arg))
        except PlotsUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{arg}: " + (", ".join(str(p) for p in written) or "nothing to plot"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
