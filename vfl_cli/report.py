"""`vfl report`: a training run's metrics.jsonl read back into typed records, three PNG plots and one HTML page.

    <run_dir>/leader/metrics.jsonl      what the loop wrote (`PartyRun.write_metrics`): start/resume, step, epoch,
                                        and, with validation, selected and final_test records
    <out>/loss.png  auc.png  speed.png  losses per global step, AUCs per epoch, train samples/s per epoch
    <out>/report.html                   one self-contained page (inline CSS, no JS, no external URLs)

The file is appended to by every `vfl train` on the run dir, so it may hold several runs (`--restart`) and,
within one run, records repeated by a resume (it replays steps after the last checkpoint). The report keeps
the run of the newest start/resume record, and within it the last record per global step and per epoch.
Unknown events and missing optional keys are ignored; a missing, empty or unparseable file is one DataError.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec

PLOTS = ("loss.png", "auc.png", "speed.png")
BASELINES = ("central", "leader-only")


@dataclass(frozen=True)
class StepPoint:
    global_step: int
    wide_loss: float | None  # log loss of the batch
    deep_loss: float | None  # log loss + the L2 term


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    samples_per_s: float | None
    seconds: float | None
    valid_auc: float | None
    valid_log_loss: float | None
    test_auc: float | None
    test_log_loss: float | None


@dataclass(frozen=True)
class Selected:
    """The epoch chosen by validation AUC (a `selected` record)."""

    epoch: int
    step: int | None
    valid_auc: float | None


@dataclass(frozen=True)
class FinalTest:
    """The test split scored once, at the end (a `final_test` record)."""

    epoch: int | None
    auc: float | None
    log_loss: float | None
    rows: int | None


@dataclass(frozen=True)
class RunMetrics:
    run_id: str | None  # of the newest start/resume record; None for a file without one
    resumes: int  # resume records of that run
    steps: list[StepPoint]  # by global step
    epochs: list[EpochRow]  # by epoch
    selected: Selected | None
    final_test: FinalTest | None

    def final(self) -> tuple[str, float | None, float | None]:
        """(where the figures come from, test AUC, test log loss): final_test, else the selected, else the last
        epoch's test figures."""
        if self.final_test is not None:
            rows = f", {self.final_test.rows:,} rows" if self.final_test.rows is not None else ""
            return f"final test (epoch {self.final_test.epoch}{rows})", self.final_test.auc, self.final_test.log_loss
        by_epoch = {e.epoch: e for e in self.epochs}
        chosen = by_epoch.get(self.selected.epoch) if self.selected else None
        if chosen is not None:
            return f"selected epoch {chosen.epoch}", chosen.test_auc, chosen.test_log_loss
        if self.epochs:
            last = self.epochs[-1]
            return f"last epoch {last.epoch}", last.test_auc, last.test_log_loss
        return "no epoch finished", None, None


# --- reading -------------------------------------------------------------------------------------------------


def _number(record: dict[str, Any], key: str, where: str) -> float | None:
    """An optional number; None when absent, null or not finite (an AUC is NaN on a one-class split)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: {key} is {value!r}, expected a number")
    return float(value) if math.isfinite(value) else None


def _integer(record: dict[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: {record.get('event')} record without an integer {key}")
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl as a dict; a missing, empty or unparseable file is a DataError."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no metrics here; has `vfl train` run with this run dir?") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not a JSON record ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise DataError(f"{path}:{number}: not a metrics record (no \"event\")")
        records.append(record | {"_line": number})
    if not records:
        raise DataError(f"{path}: empty; no metrics recorded yet")
    return records


def _newest_run(records: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The run id of the newest start/resume record, and the records written under that run id."""
    current: str | None = None
    tagged = []
    for record in records:
        if record["event"] in ("start", "resume"):
            current = record.get("run_id")
        tagged.append((current, record))
    return current, [record for run_id, record in tagged if run_id == current]


def parse_run(records: list[dict[str, Any]], source: Path) -> RunMetrics:
    run_id, mine = _newest_run(records)
    steps: dict[int, StepPoint] = {}
    epochs: dict[int, EpochRow] = {}
    selected, final_test, resumes = None, None, 0
    for r in mine:  # later records replace earlier ones: a resume replays the steps after its checkpoint
        where, event = f"{source}:{r['_line']}", r["event"]
        if event == "resume":
            resumes += 1
        elif event == "step":
            step = _integer(r, "global_step", where)
            steps[step] = StepPoint(step, _number(r, "wide_loss", where), _number(r, "deep_loss", where))
        elif event == "epoch":
            epoch = _integer(r, "epoch", where)
            epochs[epoch] = EpochRow(
                epoch, _number(r, "train_samples_per_s", where), _number(r, "seconds", where),
                _number(r, "valid_auc", where), _number(r, "valid_log_loss", where),
                _number(r, "test_auc", where), _number(r, "test_log_loss", where),
            )
        elif event == "selected":
            step_value = r.get("step")
            selected = Selected(_integer(r, "epoch", where), step_value if isinstance(step_value, int) else None,
                                _number(r, "valid_auc", where))
        elif event == "final_test":
            epoch_value, rows = r.get("epoch"), r.get("rows")
            final_test = FinalTest(epoch_value if isinstance(epoch_value, int) else None, _number(r, "auc", where),
                                   _number(r, "log_loss", where), rows if isinstance(rows, int) else None)
    if not steps and not epochs:
        raise DataError(f"{source}: no step or epoch records yet; nothing to report")
    return RunMetrics(run_id, resumes, [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)],
                      selected, final_test)


def read_run(path: Path) -> RunMetrics:
    return parse_run(read_records(path), path)


def baseline_auc(run_dir: Path, kind: str) -> str:
    """A baseline's test AUC (its final test with validation, else its last epoch's), or why there is none."""
    path = run_dir / kind / "metrics.jsonl"
    if not path.exists():
        return "not run"
    try:
        run = read_run(path)
    except DataError:
        return "not run"  # an empty or stepless file: started, never finished an epoch
    if run.final_test is not None and run.final_test.auc is not None:
        return f"{run.final_test.auc:.6f}"
    aucs = [e.test_auc for e in run.epochs if e.test_auc is not None]
    return f"{aucs[-1]:.6f}" if aucs else "not run"


# --- plots ---------------------------------------------------------------------------------------------------


def _values(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]  # NaN: a gap in the line


def write_plots(run: RunMetrics, out: Path, title: str) -> None:
    """loss.png, auc.png and speed.png into `out`; an empty plot says what is missing rather than being skipped,
    so the page's images always load."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    def figure(file: str, name: str, draw: Callable[[Any], bool]) -> None:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        if not draw(ax):
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / file)
        plt.close(fig)

    def loss(ax: Any) -> bool:
        x = [s.global_step for s in run.steps]
        ax.plot(x, _values([s.wide_loss for s in run.steps]), label="wide_loss (log loss)")
        ax.plot(x, _values([s.deep_loss for s in run.steps]), label="deep_loss (log loss + L2)", linestyle="--")
        ax.set_xlabel("global step")
        ax.set_ylabel("training loss")
        return _legend(ax, bool(x))

    def auc(ax: Any) -> bool:
        x = [e.epoch for e in run.epochs]
        drawn = False
        for label, values, marker in (("validation AUC", [e.valid_auc for e in run.epochs], "o"),
                                      ("test AUC", [e.test_auc for e in run.epochs], "s")):
            if any(v is not None for v in values):
                ax.plot(x, _values(values), marker=marker, label=label)
                drawn = True
        if run.final_test is not None and run.final_test.auc is not None and run.final_test.epoch is not None:
            ax.plot([run.final_test.epoch], [run.final_test.auc], marker="*", markersize=14, linestyle="none",
                    color="black", label="final test AUC")
            drawn = True
        if run.selected is not None:
            ax.axvline(run.selected.epoch, color="grey", linestyle=":")
            ax.text(run.selected.epoch, 0.02, f" selected: epoch {run.selected.epoch}", color="dimgrey",
                    transform=ax.get_xaxis_transform())  # x in epochs, y in axes fractions: the line's foot
        ax.set_xlabel("epoch")
        ax.set_ylabel("AUC")
        ax.xaxis.get_major_locator().set_params(integer=True)
        return _legend(ax, drawn)

    def speed(ax: Any) -> bool:
        points = [(e.epoch, e.samples_per_s) for e in run.epochs if e.samples_per_s is not None]
        ax.bar([p[0] for p in points], [p[1] for p in points], color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train samples/s")
        ax.xaxis.get_major_locator().set_params(integer=True)
        return bool(points)

    figure("loss.png", "training loss per step", loss)
    figure("auc.png", "AUC per epoch", auc)
    figure("speed.png", "train samples/s per epoch", speed)


def _legend(ax: Any, drawn: bool) -> bool:
    if drawn:
        ax.legend(fontsize=9)
    return drawn


# --- the page ------------------------------------------------------------------------------------------------

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
    selected = run.selected.epoch if run.selected else None
    rows = [[str(e.epoch), "-" if e.samples_per_s is None else f"{e.samples_per_s:,.0f}", _fmt(e.seconds, 1),
             _fmt(e.valid_auc), _fmt(e.valid_log_loss), _fmt(e.test_auc), _fmt(e.test_log_loss),
             "selected" if e.epoch == selected else ""] for e in run.epochs]
    header = ["epoch", "samples/s", "seconds", "valid AUC", "valid log loss", "test AUC", "test log loss", ""]
    return _table(header, rows, ["sel" if e.epoch == selected else "" for e in run.epochs])


def render_html(run: RunMetrics, run_dir: Path, job: JobSpec | None) -> str:
    title = f"vfl report: {job.name if job else run_dir.name}"
    source, auc, loss = run.final()
    resumed = f", resumed {run.resumes} time{'s' if run.resumes != 1 else ''}" if run.resumes else ""
    baselines = [[kind, baseline_auc(run_dir, kind)] for kind in BASELINES]
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
<p class=big>AUC <b>{escape(_fmt(auc))}</b>, log loss <b>{escape(_fmt(loss))}</b>
<span class=muted>({escape(source)})</span></p>
<h2>Baselines</h2>
{_table(["baseline", "last test AUC"], [["vertical federated (this run)", _fmt(auc)], *baselines])}
<h2>Per epoch</h2>
{_epoch_section(run)}
<h2>Plots</h2>
{images}
</body></html>
"""


def build_report(run_dir: Path, out: Path, job: JobSpec | None = None) -> Path:
    """Read `<run_dir>/leader/metrics.jsonl`, write the plots and report.html into `out`; returns the page."""
    run = read_run(run_dir / "leader" / "metrics.jsonl")
    page = out / "report.html"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_plots(run, out, job.name if job else run_dir.name)
        page.write_text(render_html(run, run_dir, job))
    except OSError as exc:
        raise DataError(f"{out}: cannot write the report ({exc})") from exc
    return page
