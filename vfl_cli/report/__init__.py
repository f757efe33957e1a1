"""`vfl report`: a training run's metrics.jsonl read back into typed records, three PNG plots and one HTML page.

    <run_dir>/leader/metrics.jsonl      what the loop wrote (`PartyRun.write_metrics`): start/resume, step, epoch,
                                        and, with validation, selected and final_test records
    <out>/loss.png                      the training losses per global step
    <out>/metric.png                    the run's primary metric (AUC, accuracy or RMSE: its task's, named by
                                        the records' "metric") per epoch, validation and test, the selected epoch
                                        and the final test marked
    <out>/speed.png                     train samples/s per epoch
    <out>/report.html                   one self-contained page (inline CSS, no JS, no external URLs): the job,
                                        rows per split, the final test's metrics, the baselines' primary metric,
                                        every metric of the task per epoch

`records` reads the file (which run, which records win after a resume, which task), `plots` draws, `page` writes
the HTML. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from vfl_cli.errors import DataError
from vfl_cli.job import JobSpec
from vfl_cli.report.page import render_html
from vfl_cli.report.plots import PLOTS, write_plots
from vfl_cli.report.records import RunMetrics, baseline_score, read_run

__all__ = ["PLOTS", "RunMetrics", "baseline_score", "build_report", "read_run"]


def build_report(run_dir: Path, out: Path, job: JobSpec | None = None) -> Path:
    """Read the leader's `<run_dir>/<label party>/metrics.jsonl`, write the plots and report.html into `out`;
    returns the page."""
    run = read_run(run_dir / (job.label_party if job else "leader") / "metrics.jsonl")
    page = out / "report.html"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_plots(run, out, job.name if job else run_dir.name)
        page.write_text(render_html(run, run_dir, job))
    except OSError as exc:
        raise DataError(f"{out}: cannot write the report ({exc})") from exc
    return page
