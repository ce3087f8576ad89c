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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_report", "collect_records", "read_metrics"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #1d2327; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff;
       min-height: 100vh; box-shadow: 0 0 12px rgba(0,0,0,.06); }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; margin-top: 2.2em; border-bottom: 2px solid #e3e6ea; padding-bottom: 4px; }
.sub { color: #5f6b76; margin-top: 0; }
nav a { margin-right: 14px; font-size: 0.92em; }
table { border-collapse: collapse; margin: 10px 0 14px; font-size: 0.86em; }
th, td { border: 1px solid #dde1e5; padding: 3px 8px; text-align: right; }
th { background: #f0f2f4; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; border: 1px solid #eceef0; }
figcaption { color: #5f6b76; font-size: 0.82em; }
code, pre { background: #f3f4f6; padding: 1px 4px; border-radius: 3px; font-size: 0.86em; }
pre { padding: 8px; overflow-x: auto; white-space: pre-wrap; }
details { margin: 6px 0; }
.note { color: #3c4650; font-size: 0.9em; }
.muted { color: #8a949e; }
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
        return f"{v:.4f}" if 1e-3 <= abs(v) < 10 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 12:
            return _esc(f"[{len(v)} values]")
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, Mapping):
        return _esc(json.dumps(v))
    return _esc(v)


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
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _same_columns(rows: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Split summary rows into runs of rows with the same keys (one table each)."""
    groups: list[list[Mapping[str, Any]]] = []
    for r in rows:
        if groups and list(groups[-1][0]) == list(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _kv_table(values: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in values.items())
    return f"<table><tbody>{rows}</tbody></table>"


def _image(path: Path, caption: str = "") -> str:
    if not path.is_file():
        return f'<p class="muted">missing figure: {_esc(path.name)}</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_esc(path.name)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _record_anchor(path: Path, record: Mapping[str, Any]) -> str:
    return _anchor(f"{record.get('experiment')}-{path.parent.name}")


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


def _training_section(run_dir: Path, out_dir: Path) -> str:
    from capsnet import plots

    parts = ['<h2 id="training">Training</h2>']
    metrics = run_dir / "metrics.jsonl"
    curves = run_dir / "curves.png"
    if metrics.is_file():
        rows = read_metrics(metrics)
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
        parts.append(_image(curves, "training curves (from metrics.jsonl)"))
    evaluation = run_dir / "evaluation.json"
    if evaluation.is_file():
        try:
            ev = json.loads(evaluation.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            ev = None
        if isinstance(ev, dict):
            scalars = {k: v for k, v in ev.items() if not isinstance(v, (list, dict))}
            parts.append("<h3>Final evaluation</h3>" + _kv_table(scalars))
    return "\n".join(parts)


def _record_section(path: Path, record: Mapping[str, Any]) -> str:
    title = str(record.get("title", record.get("experiment")))
    parts = [f'<h2 id="{_record_anchor(path, record)}">{_esc(title)}</h2>']
    meta = [f"created {record.get('created', '?')}", f"record <code>{_esc(path.name)}</code>"]
    parts.append(f'<p class="sub">{" · ".join(meta)}</p>')
    models = record.get("models") or {}
    if models:
        parts.append(
            "<p>Models: "
            + "; ".join(
                f"<b>{_esc(k)}</b> ({_esc(v.get('class', ''))}, {_fmt(v.get('parameters'))} "
                "parameters)"
                if isinstance(v, Mapping)
                else _esc(k)
                for k, v in models.items()
            )
            + "</p>"
        )
    parts.extend(_table(rows) for rows in _same_columns(record.get("summary") or []))
    for name in record.get("figures") or []:
        parts.append(_image(path.parent / name, name))
    for note in record.get("notes") or []:
        parts.append(f'<p class="note">{_esc(note)}</p>')
    details = []
    if record.get("settings"):
        details.append("<b>Settings</b>" + _kv_table(record["settings"]))
    if record.get("command"):
        details.append(f"<b>Command</b><pre>{_esc(record['command'])}</pre>")
    if details:
        parts.append("<details><summary>settings and command</summary>" + "".join(details))
        parts.append("</details>")
    return "\n".join(parts)


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
    config: dict[str, Any] = {}
    if (run_dir / "config.json").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            config = {}
    records = collect_records(run_dir)
    model = config.get("model", "?")
    dataset = config.get("dataset", "?")
    trained = (run_dir / "metrics.jsonl").is_file() or (run_dir / "config.json").is_file()
    nav = ['<a href="#training">training</a>'] * trained + [
        f'<a href="#{_record_anchor(p, r)}">{_esc(p.parent.name)}</a>' for p, r in records
    ]
    body = [
        f"<h1>{_esc(run_dir.resolve().name)}</h1>",
        f'<p class="sub">model <b>{_esc(model)}</b> on <b>{_esc(dataset)}</b> · '
        f"{len(records)} experiment record(s) · capsnet {__version__}</p>",
        f"<nav>{''.join(nav)}</nav>",
    ]
    if config:
        body.append("<details><summary>run configuration</summary>" + _kv_table(config))
        body.append("</details>")
    if trained:  # a run directory, not only an experiment folder
        body.append(_training_section(run_dir, output.parent))
    if not records:
        body.append(
            '<h2>Experiments</h2><p class="muted">none yet: run e.g. '
            f"<code>capsnet attack {_esc(run_dir)}</code> or "
            f"<code>capsnet experiment all {_esc(run_dir)}</code></p>"
        )
    for path, record in records:
        body.append(_record_section(path, record))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>capsnet report: {_esc(run_dir.name)}</title>"
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_CSS}</style></head><body><main>\n"
        + "\n".join(body)
        + "\n</main></body></html>\n"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, output)
    return output
