"""The report's one self-contained HTML page (inline CSS, no JavaScript, no external URLs); every value from
the run or the job is escaped. The figures are the run's task's: its primary metric leads the final test line and
the baselines' table, and the epoch table has a validation and a test column per metric (`records.RunMetrics`)."""

from __future__ import annotations

import time
from html import escape
from pathlib import Path

from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec
from vfl_cli.report.plots import PLOTS
from vfl_cli.report.records import BASELINES, TITLES, EpochRow, RunMetrics, Scores, baseline_score

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.5em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}tr.sel{background:#fff6d5}.big{font-size:1.3em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.muted{color:#777}"""


def _fmt(value: float | None, digits: int = 6) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], row_class: list[str] | None = None) -> str:
    """An HTML table; every cell is escaped here. The first column is left-aligned."""
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i == 0 else ''}>{escape(v)}</{tag}>" for i, v in enumerate(values))

    classes = row_class or [""] * len(rows)
    body = "".join(f"<tr{f' class={c}' if c else ''}>{cells('td', r)}</tr>" for r, c in zip(rows, classes, strict=True))
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _job_section(job: JobSpec | None) -> str:
    if job is None:
        return "<p class=muted>No job spec given (--job): parties, model and data sizes are not shown.</p>"
    rows = [[f"party ({role})", f"{p.name}: {len(p.fields)} fields"] for role, p in sorted(job.parties.items())]
    rows += [
        ["task", job.leader.task],
        ["model", f"emb_dim {job.model.emb_dim}, deep_layers {list(job.model.deep_layers)}"],
        ["train", f"{job.train.epochs} epochs, batch size {job.train.batch_size:,}, {job.train.precision}"],
        ["privacy defences", ", ".join(job.privacy.enabled) or "none"],
    ]
    return _table(["job", job.name], rows)


def _data_section(job: JobSpec | None) -> str:
    """Rows per split per party from the prepared data's meta.json; quietly nothing where there is none."""
    if job is None:
        return ""
    from data_prep.store import open_party  # numpy: only when there is a job to read data for

    rows = []
    for role in sorted(job.parties):
        if not (job.data.dir / role / "meta.json").exists():
            continue
        try:
            splits = open_party(job.data.dir, role).meta.splits
        except DataError as exc:
            rows.append([role, f"unreadable: {exc}"])
            continue
        rows.append([role, ", ".join(f"{name} {split.rows:,}" for name, split in splits.items())])
    if not rows:
        return ""
    return "<h2>Data</h2>" + _table(["party", "rows per split"], rows)


def _epoch_section(run: RunMetrics) -> str:
    """One row per epoch: speed, then each metric of the run on validation and on test (where recorded)."""
    selected = run.selected.epoch if run.selected else None
    def of(e: EpochRow, split: str) -> Scores:
        return e.valid if split == "valid" else e.test

    splits = [split for split in ("valid", "test") if any(of(e, split) for e in run.epochs)]
    columns = [(split, name) for split in splits for name in run.metrics]
    rows = [[str(e.epoch), "-" if e.samples_per_s is None else f"{e.samples_per_s:,.0f}", _fmt(e.seconds, 1),
             *(_fmt(of(e, split).get(name)) for split, name in columns),
             "selected" if e.epoch == selected else ""] for e in run.epochs]
    header = ["epoch", "samples/s", "seconds", *(f"{split} {TITLES.get(name, name)}" for split, name in columns), ""]
    return _table(header, rows, ["sel" if e.epoch == selected else "" for e in run.epochs])


def _headline(run: RunMetrics, scores: Scores) -> str:
    """`AUC <b>0.734500</b>, log loss <b>0.543200</b>`: the primary metric first, then the task's others."""
    return ", ".join(f"{escape(TITLES.get(name, name))} <b>{escape(_fmt(scores.get(name)))}</b>"
                     for name in run.metrics)


def render_html(run: RunMetrics, run_dir: Path, job: JobSpec | None) -> str:
    title = f"vfl report: {job.name if job else run_dir.name}"
    source, scores = run.final()
    resumed = f", resumed {run.resumes} time{'s' if run.resumes != 1 else ''}" if run.resumes else ""
    baselines = [[kind, baseline_score(run_dir, kind, run.metric)] for kind in BASELINES]
    images = "".join(f'<img src="{name}" alt="{escape(name)}">' for name in PLOTS)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class=muted>Run dir {escape(str(run_dir))}; run {escape(run.run_id or "unknown")}{escape(resumed)};
generated {escape(generated)}.</p>
<h2>Job</h2>
{_job_section(job)}
{_data_section(job)}
<h2>Final test</h2>
<p class=big>{_headline(run, scores)}
<span class=muted>({escape(source)})</span></p>
<h2>Baselines</h2>
{_table(["baseline", f"last test {run.title}"], [["vertical federated (this run)", _fmt(run.final_score())],
                                                *baselines])}
<h2>Per epoch</h2>
{_epoch_section(run)}
<h2>Plots</h2>
{images}
</body></html>
"""
