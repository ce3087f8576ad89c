"""``capsnet report RUN_DIR``: one self-contained HTML page for a training run (or an
experiment folder).

The page holds the run's configuration, its training curves (from ``metrics.jsonl``), the
final evaluation (``evaluation.json``) and every experiment record found under
``RUN_DIR/experiments/`` (the JSON files :mod:`capsnet.experiments` writes), each with its
summary table, figures (embedded as base64 PNGs, so the page can be mailed or archived as
one file), settings, notes and the command that produced it.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capsnet.io import atomic_write
from capsnet.runs import read_run_json

__all__ = ["build_report", "collect_records", "read_metrics"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #1d2327; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff;
       min-height: 100vh; box-shadow: 0 0 12px rgba(0,0,0,.06); box-sizing: border-box; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; overflow-wrap: anywhere; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 2px solid #e3e6ea; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.4em; }
.sub { color: #5f6b76; margin-top: 0; overflow-wrap: anywhere; }
nav { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 0.92em; margin: 8px 0; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 10px 0 14px; font-size: 0.86em; }
th, td { border: 1px solid #dde1e5; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f0f2f4; white-space: nowrap; }
td:first-child, th:first-child { text-align: left; }
td table { margin: 0; font-size: 1em; }
table.kv td { text-align: left; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eceef0; display: block; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.gallery img { flex: 1 1 300px; min-width: 0; }
figcaption { color: #3c4650; font-size: 0.84em; margin-top: 6px; max-width: 900px; }
figcaption code, .cmd code { overflow-wrap: anywhere; }
code, pre { background: #f3f4f6; padding: 1px 4px; border-radius: 3px; font-size: 0.86em; }
pre { padding: 8px; overflow-x: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.cmd { font-size: 0.9em; margin: 4px 0 10px; }
details { margin: 6px 0; }
.note { color: #3c4650; font-size: 0.9em; }
.muted { color: #8a949e; }
@media (max-width: 640px) { main { padding: 12px 12px 40px; } h1 { font-size: 1.35em; } }
"""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (unparseable lines are skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def collect_records(run_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """Experiment records as ``(json path, record)``, oldest first.

    Looks under ``run_dir/experiments/`` (where the per-model commands write) and at the
    JSON files in ``run_dir`` itself (an experiment folder such as the output of
    ``capsnet experiment viewpoint``).
    """
    run_dir = Path(run_dir)
    root = run_dir / "experiments"
    paths = sorted(run_dir.glob("*.json"))
    if root.is_dir():
        paths += sorted(root.rglob("*.json"))
    found = []
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "experiment" in record and "title" in record:
            found.append((path, record))
    found.sort(key=lambda item: (str(item[1].get("created", "")), str(item[0])))
    return found


# --------------------------------------------------------------------------- html pieces

# Sections in the order of docs/experiments.md; other experiments follow, oldest first.
_ORDER = (
    "seeds",
    "attack",
    "rotation_sweep",
    "translation_sweep",
    "scale_sweep",
    "affnist",
    "affnist_protocol",
    "viewpoint_azimuth",
    "viewpoint_elevation",
    "equivariance",
    "reconstruction",
    "routing",
)

# What each figure shows, by file name (``{kind}`` is filled from the name); the first
# pattern that matches wins. Figures of one series (``name_0.png``, ``name_1.png``, ...)
# share one caption.
_CAPTIONS: tuple[tuple[str, str], ...] = (
    (
        r"seeds\.png",
        "Test error of each model pooled over its training seeds, with the 95 % bootstrap "
        "interval over test images and seeds.",
    ),
    (
        r"attack\.png",
        "Accuracy on FGSM and BIM adversarial test images (untargeted panels) and the "
        "fraction classified as the attacker's target class (targeted panels) against the "
        "L-inf budget epsilon, one line per model.",
    ),
    (
        r"(?P<kind>rotation|translation|scale)_sweep\.png",
        "Test accuracy against the {kind} applied to the test images, one line per model; "
        "the shaded band, when present, is the range seen in training.",
    ),
    (
        r"affnist\.png",
        "Accuracy of each model on the familiar test set (the digits it was trained on) "
        "and on the affine test set.",
    ),
    (
        r".*_tradeoff\.png",
        "Novel-set against familiar-set test error after every training epoch, one line "
        "per model; the circled points are the epochs compared, at the matched familiar "
        "error (dashed line).",
    ),
    (
        r"(affnist_protocol|viewpoint_\w+)\.png",
        "Familiar and novel test error of each model at the matched familiar error.",
    ),
    (
        r"equivariance_(?P<kind>\w+)\.png",
        "Held-out residual (1 - R^2) of the best linear map from the features f(x) to "
        "f(Tx) (solid) and of the identity map (dotted) against the size of the {kind} T, "
        "per model and feature set: low solid = the features move predictably with T; "
        "low dotted = they do not move at all.",
    ),
    (
        r"reconstructions\.png",
        "Test inputs (top rows) and the decoder's reconstructions from the longest class "
        "capsule, the others masked (bottom rows).",
    ),
    (
        r"perturbation_\d+\.png",
        "Pose perturbations, one image per test digit: row d decodes the predicted class "
        "capsule with -0.25 ... +0.25 (columns) added to its dimension d.",
    ),
    (
        r"couplings_\d+\.png",
        "Coupling coefficients c_ij (dynamic routing) or assignments R_ij (EM) after each "
        "routing iteration, one image per test input: children (rows, sorted by the parent "
        "they end up preferring) by class capsules (columns).",
    ),
    (
        r"vote_distances_\d+\.png",
        "Distance of every vote to its parent's mean, weighted by the vote's assignment, "
        "one image per test input: class capsules in columns, routing iterations in rows "
        "(as Hinton et al. 2018, Fig. 2).",
    ),
    (
        r"agreement_distance\.png",
        "Assignment-weighted mean distance of the votes to the true class capsule's mean "
        "and to the other classes' means, per routing iteration.",
    ),
    (
        r"agreement_cosine\.png",
        "Assignment-weighted mean cosine between the votes and the true class capsule's "
        "mean, and the other classes' means, per routing iteration.",
    ),
    (
        r"dead_capsules\.png",
        "Fraction of the capsules of each layer whose activation (length) never exceeds the "
        "threshold on the test inputs.",
    ),
)

_SERIES = re.compile(r"^(?P<stem>.+)_\d+\.png$")


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return _esc("—" if v is None else v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if v == 0:
            return "0"
        if 1e-3 <= abs(v) < 10:
            return f"{v:.4f}"
        return f"{v:.3e}" if abs(v) < 1e-3 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 12:
            return _esc(f"[{len(v)} values]")
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, Mapping):
        return _esc(json.dumps(v))
    return _esc(v)


def _scroll(table: str) -> str:
    """A table in a box that scrolls sideways instead of widening the page."""
    return f'<div class="scroll">{table}</div>' if table else ""


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r[c]) if c in r else ''}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    table = f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
    return _scroll(f'<table class="data">{table}</table>')


def _same_columns(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Split summary rows into runs of rows with the same keys (one table each)."""
    groups: list[list[Mapping[str, Any]]] = []
    for r in rows:
        if groups and list(groups[-1][0]) == list(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _kv_rows(values: Mapping[str, Any], depth: int = 0) -> str:
    cells = []
    for k, v in values.items():
        if isinstance(v, Mapping) and v and depth < 2:
            inner = f'<table class="kv"><tbody>{_kv_rows(v, depth + 1)}</tbody></table>'
        else:
            inner = _fmt(v)
        cells.append(f"<tr><td>{_esc(k)}</td><td>{inner}</td></tr>")
    return "".join(cells)


def _kv_table(values: Mapping[str, Any]) -> str:
    """Key-value table; nested mappings (e.g. per-model configs) as nested tables."""
    return _scroll(f'<table class="kv"><tbody>{_kv_rows(values)}</tbody></table>')


def _png_width(data: bytes) -> int | None:
    """Pixel width from a PNG header, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big")
    return None


def _img(path: Path, style: str = "") -> str:
    data = path.read_bytes()
    src = base64.b64encode(data).decode("ascii")
    return f'<img alt="{_esc(path.name)}"{style} src="data:image/png;base64,{src}">'


def _caption_for(name: str) -> str:
    for pattern, text in _CAPTIONS:
        m = re.fullmatch(pattern, name)
        if m:
            return text.format(kind=m.groupdict().get("kind") or "transform")
    return ""


def _figure(paths: Sequence[Path], number: int, what: str, command: str = "") -> str:
    """One numbered figure (several images of a series side by side), with a caption that
    says what it shows, its file(s) and the command that made it."""
    present = [p for p in paths if p.is_file()]
    missing = [p.name for p in paths if not p.is_file()]
    parts = []
    if len(present) == 1:
        parts.append(_img(present[0]))
    elif present:
        imgs = []
        for p in present:
            width = _png_width(p.read_bytes()[:24])
            # Narrow images sit side by side (up to three in the 1,036 px column); wide
            # ones take the whole row. None is ever shown larger than its own pixels.
            style = (
                f' style="flex-basis: {width / 2.2:.0f}px; max-width: {width}px"' if width else ""
            )
            imgs.append(_img(p, style))
        parts.append(f'<div class="gallery">{"".join(imgs)}</div>')
    files = ", ".join(p.name for p in paths)
    cap = f"<b>Figure {number}.</b> {_esc(what)}" if what else f"<b>Figure {number}.</b>"
    cap += f' <span class="muted">({_esc(files)})</span>'
    if missing:
        cap += f' <span class="muted">missing: {_esc(", ".join(missing))}</span>'
    if command:
        cap += f"<br>Made by <code>{_esc(command)}</code>"
    if not present:
        return f'<p class="muted">Figure {number}: missing {_esc(files)}</p>'
    return f"<figure>{''.join(parts)}<figcaption>{cap}</figcaption></figure>"


def _figure_groups(names: Sequence[str]) -> list[list[str]]:
    """Figure names grouped into series (``couplings_0.png``, ``couplings_1.png``, ...),
    each series where its first member was."""
    groups: dict[str, list[str]] = {}
    for name in names:
        m = _SERIES.match(name)
        groups.setdefault(m.group("stem") if m else name, []).append(name)
    return list(groups.values())


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _record_anchor(path: Path, record: Mapping[str, Any]) -> str:
    return _anchor(f"{record.get('experiment')}-{path.parent.name}")


def _record_label(path: Path, record: Mapping[str, Any], run_dir: Path) -> str:
    """The folder of a record (``attack``, ``attack_model_loss``), or its experiment name
    when it sits at the top of the reported folder."""
    if path.parent.resolve() == run_dir.resolve():
        return str(record.get("experiment", path.stem))
    return path.parent.name


def _order(records: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    """Records in the order of docs/experiments.md, then the others oldest first."""
    rank = {name: i for i, name in enumerate(_ORDER)}
    indexed = list(enumerate(records))  # collect_records' order: oldest first
    indexed.sort(key=lambda item: (rank.get(str(item[1][1].get("experiment")), len(rank)), item[0]))
    return [r for _, r in indexed]


def _curve_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Loss / accuracy / error series from ``metrics.jsonl`` rows (as the trainer plots)."""
    out = []
    for r in rows:
        if r.get("kind") == "train" and "epoch" in r:
            out.append(
                {
                    "epoch": r["epoch"],
                    **{f"train_{k}": r[k] for k in ("loss", "accuracy") if k in r},
                }
            )
        elif r.get("kind") == "epoch":
            keep = {
                k: v
                for k, v in r.items()
                if k.endswith(("_loss", "_accuracy", "_error")) and not k.startswith("train_")
            }
            out.append({"epoch": r["epoch"], **keep})
    return out


def _training_command(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
    """The command(s) that trained the run, from the ``start`` rows of ``metrics.jsonl``."""
    commands = [str(r["command"]) for r in rows if r.get("kind") == "start" and r.get("command")]
    if commands:
        return commands[0] + "".join(f"; resumed with {c}" for c in commands[1:])
    recipe = config.get("recipe")
    return f"capsnet train --recipe {recipe} ..." if recipe else "capsnet train ..."


def _training_section(
    run_dir: Path, out_dir: Path, config: Mapping[str, Any], number: int
) -> tuple[str, int]:
    from capsnet import plots

    parts = ['<h2 id="training">Training</h2>']
    metrics = run_dir / "metrics.jsonl"
    curves = run_dir / "curves.png"
    rows = read_metrics(metrics) if metrics.is_file() else []
    command = _training_command(rows, config)
    starts = [r for r in rows if r.get("kind") == "start"]
    if starts:
        s = starts[-1]
        facts = [
            f"{_fmt(s.get('parameters'))} parameters" if s.get("parameters") else "",
            f"{_fmt(s.get('train_images'))} training images" if s.get("train_images") else "",
            f"{s.get('steps_per_epoch')} steps of {config.get('batch_size', '?')} images "
            "per epoch (global batch)"
            if s.get("steps_per_epoch")
            else "",
            f"device {s.get('device')}" if s.get("device") else "",
            f"{s.get('world_size')} ranks" if (s.get("world_size") or 1) > 1 else "",
        ]
        parts.append(f'<p class="sub">{" · ".join(_esc(f) for f in facts if f)}</p>')
    parts.append(f'<p class="cmd">Command: <code>{_esc(command)}</code></p>')
    if metrics.is_file():
        epochs = [r for r in rows if r.get("kind") == "epoch"]
        if not curves.is_file() and rows:
            try:
                curves = plots.plot_training_curves(
                    _curve_rows(rows), out_dir / "report_training_curves.png", x_key="epoch"
                )
            except ValueError:
                pass
        if epochs:
            keep = [k for k in epochs[-1] if k not in ("kind", "time")]
            parts.append(_table([{k: r.get(k) for k in keep} for r in epochs]))
    else:
        parts.append('<p class="muted">no metrics.jsonl in this run directory</p>')
    if curves.is_file():
        number += 1
        parts.append(
            _figure(
                [curves],
                number,
                "Training curves from metrics.jsonl: loss (log scale) and accuracy on the "
                "training batches (every log_every steps) and on the evaluation split "
                "(after each epoch), against the epoch.",
                command,
            )
        )
    ev = read_run_json(run_dir, "evaluation.json")
    if ev:
        scalars = {k: v for k, v in ev.items() if not isinstance(v, (list, dict))}
        parts.append("<h3>Final evaluation</h3>" + _kv_table(scalars))
        per_class = ev.get("per_class_accuracy")
        if isinstance(per_class, list) and per_class:
            classes = ev.get("classes")
            if not isinstance(classes, list) or len(classes) != len(per_class):
                classes = list(range(len(per_class)))
            row = {str(c): a for c, a in zip(classes, per_class, strict=True)}
            parts.append(_table([{"class": "accuracy", **row}]))
    return "\n".join(parts), number


def _model_text(name: str, info: Any) -> str:
    if not isinstance(info, Mapping):
        return f"<b>{_esc(name)}</b>"
    bits = [str(info.get("class") or info.get("registry_name") or "")]
    if info.get("parameters"):
        bits.append(f"{_fmt(info['parameters'])} parameters")
    if info.get("run_dir"):
        bits.append(f"run {info['run_dir']}")
    bits = [b for b in bits if b]
    return f"<b>{_esc(name)}</b>" + (f" ({_esc(', '.join(bits))})" if bits else "")


def _record_section(path: Path, record: Mapping[str, Any], number: int) -> tuple[str, int]:
    title = str(record.get("title", record.get("experiment")))
    parts = [f'<h2 id="{_record_anchor(path, record)}">{_esc(title)}</h2>']
    created = _esc(record.get("created", "?"))
    meta = [f"created {created}", f"record <code>{_esc(path.name)}</code>"]
    parts.append(f'<p class="sub">{" · ".join(meta)}</p>')
    command = str(record.get("command") or "")
    if command:
        parts.append(f'<p class="cmd">Command: <code>{_esc(command)}</code></p>')
    models = record.get("models") or {}
    if models:
        parts.append(
            "<p>Models: " + "; ".join(_model_text(k, v) for k, v in models.items()) + "</p>"
        )
    parts.extend(_table(rows) for rows in _same_columns(record.get("summary") or []))
    # Figures are plain file names beside the record: a name with a folder in it (or
    # "..") is not embedded, so a record cannot pull other files into the page.
    names = [str(n) for n in record.get("figures") or []]
    for bad in [n for n in names if Path(n).name != n or n in ("", ".", "..")]:
        parts.append(f'<p class="muted">figure {_esc(bad)!s} skipped: not a file name</p>')
    names = [n for n in names if Path(n).name == n and n not in ("", ".", "..")]
    for group in _figure_groups(names):
        number += 1
        what = _caption_for(group[0]) or title
        parts.append(_figure([path.parent / n for n in group], number, what, command))
    for note in record.get("notes") or []:
        parts.append(f'<p class="note">{_esc(note)}</p>')
    if record.get("settings"):
        parts.append("<details><summary>settings</summary>" + _kv_table(record["settings"]))
        parts.append("</details>")
    return "\n".join(parts), number


# --------------------------------------------------------------------------- page


def build_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of a run directory and return its path.

    Args:
        run_dir: a run directory written by ``capsnet train`` (``config.json``,
            ``metrics.jsonl``, ...), with experiments under ``experiments/``.
        output: the HTML file (default ``RUN_DIR/report.html``).

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
    """
    from capsnet import __version__

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    output = Path(output) if output else run_dir / "report.html"
    config = read_run_json(run_dir, "config.json")
    records = _order(collect_records(run_dir))
    trained = (run_dir / "metrics.jsonl").is_file() or (run_dir / "config.json").is_file()
    nav = ['<a href="#training">training</a>'] * trained + [
        f'<a href="#{_record_anchor(p, r)}">{_esc(_record_label(p, r, run_dir))}</a>'
        for p, r in records
    ]
    count = f"{len(records)} experiment record{'s' * (len(records) != 1)}"
    if trained:
        what = [
            f"model <b>{_esc(config.get('model', '?'))}</b> on "
            f"<b>{_esc(config.get('dataset', '?'))}</b>"
        ]
        if config.get("recipe"):
            what.append(f"recipe {_esc(config['recipe'])}")
        if config.get("epochs"):
            what.append(f"{_esc(config['epochs'])} epochs")
    else:
        what = ["experiment folder"]
    body = [
        f"<h1>{_esc(run_dir.resolve().name)}</h1>",
        f'<p class="sub">{" · ".join([*what, count, f"capsnet {_esc(__version__)}"])}</p>',
    ]
    if config.get("description"):
        body.append(f"<p>Description: {_esc(config['description'])}</p>")
    body.append(f"<nav>{''.join(nav)}</nav>")
    if config:
        body.append("<details><summary>run configuration</summary>" + _kv_table(config))
        body.append("</details>")
    number = 0
    if trained:  # a run directory, not only an experiment folder
        section, number = _training_section(run_dir, output.parent, config, number)
        body.append(section)
    if not records:
        body.append(
            '<h2>Experiments</h2><p class="muted">none yet: run e.g. '
            f"<code>capsnet experiment attack {_esc(run_dir)}</code> or "
            f"<code>capsnet experiment all {_esc(run_dir)}</code></p>"
        )
    for path, record in records:
        section, number = _record_section(path, record, number)
        body.append(section)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>capsnet report: {_esc(run_dir.name)}</title>"
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style></head><body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )
    return atomic_write(output, page)
