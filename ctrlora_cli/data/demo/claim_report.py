"""The claim stage's results as data (``docs/claim.json``), a table and a picture
(``docs/claim.png``), from the per-run results of ``engine.demo.claim.run_arm``.

The rule, stated before the run: for each held-out condition and data size, the mark is half-way
from the bare base's score to the data's own targets' score; an arm's "steps to the mark" is where
its curve, averaged over seeds, first passes it (linear between measured step counts). The claim
holds at a data size when the adapter (b) reaches the mark in fewer steps than the standard
ControlNet (c) for every held-out condition.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from engine.demo.claim import ARMS, steps_to


def summarise(runs: list[dict], bare: dict[str, dict], sweep: dict, settings: dict) -> dict:
    """``runs``: run_arm results at the chosen learning rates; ``bare``: per condition, the bare
    base's eval (with the ceiling); ``sweep``: per arm, the learning rates tried and their scores."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        run = r["run"]
        groups.setdefault((run["kind"], run["pairs"], run["arm"]), []).append(r)
    panels = []
    for kind in settings["conditions"]:
        b = bare[kind]
        metric, higher = b["metric"], b["higher_is_better"]
        start, ceiling = b["value"], b["ceiling"][metric]
        mark = start + 0.5 * (ceiling - start)
        for pairs in settings["sizes"]:
            arms = {}
            for arm in settings["arms"]:
                members = groups.get((kind, pairs, arm), [])
                if not members:
                    continue
                steps = [p["steps"] for p in members[0]["curve"]]
                values = [[p["value"] for p in m["curve"]] for m in members]
                mean = [statistics.fmean(v[i] for v in values) for i in range(len(steps))]
                reached = [steps_to(list(zip(steps, v)), mark, higher) for v in values]
                arms[arm] = {
                    "label": ARMS[arm], "lr": members[0]["run"]["lr"], "seeds": [m["run"]["seed"] for m in members],
                    "steps": steps, "mean": mean, "min": [min(v[i] for v in values) for i in range(len(steps))],
                    "max": [max(v[i] for v in values) for i in range(len(steps))], "per_seed": values,
                    "steps_to_mark": steps_to(list(zip(steps, mean)), mark, higher),
                    "steps_to_mark_per_seed": reached,
                    "train_seconds": statistics.fmean(m["train_seconds"] for m in members),
                    "eval_seconds": statistics.fmean(m["eval_seconds"] for m in members),
                    "trainable_parameters": members[0]["trainable_parameters"],
                }
            panels.append({"condition": kind, "pairs": pairs, "metric": metric, "higher_is_better": higher,
                           "bare": start, "ceiling": ceiling, "mark": mark, "arms": arms})
    return {"rule": __doc__.split("\n\n")[1].replace("\n", " "), "settings": settings, "sweep": sweep,
            "panels": panels, "verdict": verdict(panels)}


def verdict(panels: list[dict]) -> dict:
    """Per data size: does the adapter reach the mark before the standard ControlNet on every
    held-out condition? (None where either arm is missing.)"""
    out = {}
    for pairs in sorted({p["pairs"] for p in panels}):
        wins = []
        for p in (p for p in panels if p["pairs"] == pairs):
            a, c = p["arms"].get("adapter"), p["arms"].get("controlnet")
            if a is None or c is None:
                wins.append(None)
                continue
            sa, sc = a["steps_to_mark"], c["steps_to_mark"]
            wins.append(sa is not None and (sc is None or sa < sc))
        out[str(pairs)] = None if None in wins else all(wins)
    return out


def _reach(n: float | None, last: int) -> str:
    return f"> {last}" if n is None else f"{n:.0f}"


def markdown(summary: dict) -> str:
    """One table: a row per panel and arm."""
    lines = ["| condition, pairs | arm | lr | score after " + " / ".join(
        str(n) for n in summary["settings"]["curve"]) + " steps (mean of seeds) | steps to the mark | "
        "training s | trainable params |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in summary["panels"]:
        head = f"{p['condition']}, {p['pairs']}"
        lines.append(f"| {head} | (a) bare base: {p['metric']} {p['bare']:.3f}; targets {p['ceiling']:.3f}; "
                     f"mark {p['mark']:.3f} | | | | | |")
        for arm, a in p["arms"].items():
            spread = " / ".join(f"{m:.3f}" for m in a["mean"])
            lines.append(f"| {head} | {a['label']} | {a['lr']:g} | {spread} | "
                         f"{_reach(a['steps_to_mark'], a['steps'][-1])} | {a['train_seconds']:.0f} | "
                         f"{a['trainable_parameters'] / 1e6:.2f} M |")
    bases = summary["settings"].get("bases") or {}
    if len(bases) > 1:
        first = next(iter(bases.values()))
        lines += ["", f"| base | {summary['settings']['conditions'][0]}: bare base | adapter after "
                  + " / ".join(str(n) for n, _ in first["curve"]) + " steps (seed 0, lr "
                  f"{summary['settings'].get('ablation_lr', '')}) |", "| --- | --- | --- |"]
        for name, row in bases.items():
            lines.append(f"| {name} | {row['bare']:.3f} | " + " / ".join(f"{v:.3f}" for _, v in row["curve"]) + " |")
    v = summary["verdict"]
    lines += ["", "Claim holds (adapter reaches the mark before the standard ControlNet on every condition): "
              + ", ".join(f"{k} pairs: {'yes' if ok else 'no' if ok is False else 'n/a'}" for k, ok in v.items())]
    return "\n".join(lines)


COLOURS = {"adapter": (214, 39, 40), "controlnet": (31, 119, 180), "scratch": (44, 160, 44), "full": (148, 103, 189)}


def draw(summary: dict, path: Path, panel: tuple[int, int] = (420, 300)) -> Path:
    """F1 (or the condition's score) against steps, one panel per condition and data size, one
    line per arm (mean of seeds) with its spread (min to max) shaded; the bare base, the mark and
    the targets' score as dashed lines. Log-scaled steps. Drawn with PIL."""
    import math

    from PIL import Image, ImageDraw

    from engine.files import atomic_path

    panels = summary["panels"]
    columns = len(summary["settings"]["sizes"])
    rows = math.ceil(len(panels) / columns)
    pw, ph = panel
    legend_h = 28
    sheet = Image.new("RGB", (pw * columns, ph * rows + legend_h), "white")
    draw_ = ImageDraw.Draw(sheet, "RGBA")
    left, right, top, bottom = 52, 12, 26, 34
    for index, p in enumerate(panels):
        ox, oy = (index % columns) * pw, (index // columns) * ph
        x0, x1, y0, y1 = ox + left, ox + pw - right, oy + top, oy + ph - bottom
        steps = [n for a in p["arms"].values() for n in a["steps"]] or [1]
        lo_s, hi_s = math.log(min(steps)), math.log(max(steps))
        values = [p["bare"], p["ceiling"], p["mark"]] + [v for a in p["arms"].values() for v in a["min"] + a["max"]]
        lo_v, hi_v = min(values), max(values)
        pad = (hi_v - lo_v) * 0.05 or 0.05
        lo_v, hi_v = lo_v - pad, hi_v + pad

        def xy(s, v):
            x = x0 + (math.log(s) - lo_s) / ((hi_s - lo_s) or 1) * (x1 - x0)
            return x, y1 - (v - lo_v) / (hi_v - lo_v) * (y1 - y0)

        draw_.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        draw_.text((x0, oy + 6), f"{p['condition']} (held out), {p['pairs']} pairs: {p['metric']}", fill=(0, 0, 0))
        for n in sorted(set(steps)):
            x, _ = xy(n, lo_v)
            draw_.line((x, y1, x, y1 + 4), fill=(0, 0, 0))
            draw_.text((x - 8, y1 + 6), str(n), fill=(0, 0, 0))
        draw_.text((x0 + (x1 - x0) // 2 - 14, y1 + 19), "steps", fill=(0, 0, 0))
        for k in range(5):
            v = lo_v + (hi_v - lo_v) * k / 4
            _, y = xy(min(steps), v)
            draw_.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
            draw_.text((ox + 6, y - 6), f"{v:.3f}" if hi_v - lo_v < 0.2 else f"{v:.2f}", fill=(0, 0, 0))
        for value, label in ((p["bare"], "bare"), (p["mark"], "mark"), (p["ceiling"], "targets")):
            if lo_v <= value <= hi_v:
                _, y = xy(min(steps), value)
                for x in range(int(x0), int(x1), 8):
                    draw_.line((x, y, min(x + 4, x1), y), fill=(120, 120, 120))
                draw_.text((x1 - 44, y - 11), label, fill=(100, 100, 100))
        for arm, a in p["arms"].items():
            colour = COLOURS.get(arm, (0, 0, 0))
            band = [xy(s, v) for s, v in zip(a["steps"], a["max"])] + [
                xy(s, v) for s, v in reversed(list(zip(a["steps"], a["min"])))]
            if len(band) > 2:
                draw_.polygon(band, fill=(*colour, 50))
            line = [xy(s, v) for s, v in zip(a["steps"], a["mean"])]
            draw_.line(line, fill=colour, width=2)
            for x, y in line:
                draw_.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    x = 8
    y = ph * rows + 8
    for arm in summary["settings"]["arms"]:
        colour = COLOURS.get(arm, (0, 0, 0))
        draw_.line((x, y + 6, x + 18, y + 6), fill=colour, width=3)
        label = ARMS[arm]
        draw_.text((x + 22, y), label, fill=(0, 0, 0))
        x += 30 + int(draw_.textlength(label))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
