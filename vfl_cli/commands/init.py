"""`vfl init`: the parties' files (a leader's, one or more followers') -> a commented job YAML that runs as it
is, and the commands to run next.

`vfl_cli.init_job` reads the files and decides what the job says (kinds, task, sizes, ports); this module owns
the command's options, the job's text (written by hand, so that it keeps its comments, with every name quoted
where YAML needs it, and checked with `vfl_cli.job.parse_job` before anything is written) and the list of the
commands a new user runs next, which it prints and also puts in the job's header.
"""

from __future__ import annotations

import datetime
import re
import shlex
import textwrap
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from vfl_cli.console import console
from vfl_cli.errors import JobError
from vfl_cli.init_job import Draft, Party, follower_arg, free_ports, plan_job, training_defaults, vocab_threshold
from vfl_cli.job import parse_job


class TaskChoice(str, Enum):
    binary = "binary"
    multiclass = "multiclass"
    regression = "regression"


def init(
    leader: Annotated[Path, typer.Option(
        "--leader", help="The leader's file (it holds the labels): CSV or TSV with a header row, plain or .gz "
        "(a tab in the header line means TSV), or .parquet; the id column, the label column and feature "
        "columns.", show_default=False)],
    follower: Annotated[list[str], typer.Option(
        "--follower", help="A follower's file, in the same formats: the id column and its feature columns "
        "(names are its own: every file may call theirs x0, x1, ...). Repeat it for more followers. NAME=FILE "
        "names one (its key in the job and its party name; NAME: letters, digits, '.', '_', '-'); unnamed ones "
        "are follower when alone, else follower1, follower2, ... in the order given (write ./a=b.csv for a file "
        "whose name holds '=').", metavar="[NAME=]FILE", show_default=False)],
    id_column: Annotated[str, typer.Option(
        "--id", help="The customer id column, in every file: what vfl psi matches on.", show_default=False)],
    label: Annotated[str, typer.Option(
        "--label", help="The label column, in the leader's file.", show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", help="The job YAML to write, e.g. jobs/mine.yaml.", show_default=False)],
    task: Annotated[TaskChoice | None, typer.Option(
        "--task", help="binary (labels 0/1), multiclass or regression. Default: from the label's values (0 and "
        "1: binary; words, or at most 10 integers: multiclass; other numbers: regression).",
        show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="The job's name (letters, digits, '.', '_', '-'); its files go under runs/<name>/. "
        "Default: the leader file's name less role words such as guest or leader (credit_guest.csv -> credit).",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write a job for the parties' files (a leader and one or more followers): each column's kind (numeric or
    categorical) and the task inferred from the first rows, sizes from the row count, a free local port per
    party, every path under runs/<name>/.

    Comments in the file mark the guesses worth a look. Prints the commands to run next.
    """
    check_out(out, force)  # before reading anything
    draft = plan_job(leader, [follower_arg(value) for value in follower], id_column, label,
                     task.value if task else None, name)
    commands = next_commands(draft, out)
    write_job(draft, out, commands, force)
    say = console.print
    counts = ", ".join(f"{len(party.columns)} {party.key}" for party in draft.parties)
    say(f"wrote {out}: task {draft.task} ({draft.task_note}); feature columns: {counts}", soft_wrap=True,
        markup=False)
    say(f"next, from this directory ({_at_once(draft)} run at once):", markup=False)
    for command in commands:
        say(f"  {command}", soft_wrap=True, markup=False)


def shown(path: Path) -> str:
    """A path as a command names it: relative to the current directory when under it, shell-quoted."""
    resolved = path.resolve()
    try:
        return shlex.quote(str(resolved.relative_to(Path.cwd().resolve())))
    except ValueError:
        return shlex.quote(str(resolved))


def _at_once(draft: Draft) -> str:
    """Which of the next commands run together, as the printout and the job's header say it."""
    if len(draft.parties) == 2:
        return "a terminal 1 line and the terminal 2 line after it"
    last = len(draft.parties)
    return f"a terminal 1 line and the terminal 2 {'and' if last == 3 else 'to'} {last} lines after it"


def next_commands(draft: Draft, job_path: Path) -> list[str]:
    """The commands to run next, in order, runnable from the current directory (a '#' note after some).

    Each party's step runs in a terminal of its own, the leader's in terminal 1; a two-party job's commands name
    the party with `--role leader | follower`, any other's with `--party KEY`."""
    job = f"--job {shown(job_path)}"
    who = {p.key: f"--role {p.key}" if draft.two_party else f"--party {p.key}" for p in draft.parties}
    terminal = {p.key: "  # terminal 1" if n == 1 else f"  # terminal {n}, at the same time"
                for n, p in enumerate(draft.parties, start=1)}
    steps = [(verb, "") for verb in ("psi", "train", "eval")] + [("infer", f" --out runs/{draft.name}/predictions.csv")]
    return [
        f"vfl certs {job}  # a dev CA and a certificate per party",
        *(f"vfl prep table {job} {who[p.key]} --input {shown(p.sample.path)}" for p in draft.parties),
        *(f"vfl {verb} {job} {who[p.key]}{extra if p is draft.leader else ''}{terminal[p.key]}"
          for verb, extra in steps for p in draft.parties),  # only the leader writes predictions
        f"vfl report {job}  # plots and report.html of the training run",
    ]


def _printable(char: str) -> bool:  # what PyYAML reads unescaped in a double-quoted scalar
    code = ord(char)
    return 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD and code != 0xFEFF \
        or code >= 0x10000


def _quoted(text: str) -> str:
    """`text` as a YAML double-quoted scalar (YAML's escapes: \\", \\\\, \\xXX, \\uXXXX, \\UXXXXXXXX)."""
    def escape(char: str) -> str:
        code = ord(char)
        if char in '"\\':
            return "\\" + char
        if _printable(char):
            return char
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return '"' + "".join(escape(c) for c in text) + '"'


def yaml_str(text: str) -> str:
    """`text` as a YAML key or value: plain where YAML reads it back as this very string, else double-quoted."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./:-]*", text):
        try:
            if yaml.safe_load(f"{text}: {text}") == {text: text}:
                return text
        except yaml.YAMLError:
            pass
    return _quoted(text)


def _float(value: float) -> str:
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"  # 1.0e-3: PyYAML reads a float only with its dot and the sign


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _comment(text: str, lead: str = "  ") -> str:
    """`text` as a comment ('' for none), control characters blanked so that it stays on its line."""
    return f"{lead}# {_CONTROL.sub(' ', text)}" if text else ""


def _flow(mapping: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_float(v) if isinstance(v, float) else v}" for k, v in mapping.items()) + "}"


def _party_lines(draft: Draft, party: Party, port: int) -> list[str]:
    role = party.key  # its key, name and the name of its certificate's files
    lines = [f"  {role}:", f"    name: {role}", *(_comment(note, "    ") for note in party.notes)]
    if party.columns:
        lines.append("    columns:  # name: numeric | categorical, in the file's order")
        lines += [f"      {yaml_str(c.name)}: {c.kind}{_comment(c.note)}" for c in party.columns]
    else:
        lines.append("    columns: {}  # no feature columns besides the id and the label: a label-only leader")
    lines.append(f"    id_column: {yaml_str(draft.id_column)}")
    if party is draft.leader:
        lines += [f"    label_column: {yaml_str(draft.label_column)}", f"    task: {draft.task}"
                  f"{_comment(draft.task_note)}"]
    elif "label" in {draft.id_column, *(c.name for c in party.columns)}:  # the default label_column would clash
        lines.append(f"    label_column: {yaml_str(draft.label_column)}  # not in this file: keeps the default "
                     "name `label` off this party's own column")
    certs = f"runs/{draft.name}/certs"
    listen = yaml_str(f"127.0.0.1:{port}")
    return lines + [f"    listen: {listen}  # host:port its HTTPS server binds (free when written)",
                    f"    threads: 1  # torch threads: the {_count(draft)} parties share this machine",
                    f"    cert: {certs}/{role}.pem  # made by vfl certs", f"    key: {certs}/{role}.key"]


def _count(draft: Draft) -> str:
    return "two" if len(draft.parties) == 2 else str(len(draft.parties))


def render_job(draft: Draft, commands: Sequence[str]) -> str:
    """The job's YAML text with its comments; `commands` (the ones to run next) go into the header."""
    lead = draft.leader
    settings = training_defaults(draft.rows, sum(len(party.columns) for party in draft.parties))
    model, train = settings["model"], settings["train"]
    threshold, why = vocab_threshold(draft.rows)
    runs = f"runs/{draft.name}"

    def described(party: Party, extra: str = "") -> str:
        rows = f"{'' if party.sample.counted else 'about '}{party.sample.total_rows:,}"
        return f"{party.sample.path} ({rows} rows, {len(party.columns)} feature columns{extra})"

    width = max(len(party.key) for party in draft.parties) + 2  # "follower: " for two parties
    every, whose = ("both parties", "both parties'") if len(draft.parties) == 2 else ("every party", "every party's")
    run = f"Then run, from the directory `vfl init` ran in ({_at_once(draft)} run at the same time):"
    lines = [
        f"# vfl job {draft.name}, generated by `vfl init` on {datetime.date.today().isoformat()} from",
        *(f"#   {(party.key + ':').ljust(width)}"
          f"{described(party, f', label {draft.label_column}' if party is lead else '')}" for party in draft.parties),
        "# Check the columns' kinds and the task (the comments mark the guesses); vfl_cli/job.py documents every",
        *textwrap.wrap(f"key. {run}", 108, initial_indent="# ", subsequent_indent="# "),
        *(f"#   {_CONTROL.sub(' ', command)}" for command in commands),
        "",
        f"name: {yaml_str(draft.name)}",
        f"seed: 0  # shared by {every}: test split, batch order, initial weights",
        "data:",
        f"  dir: {runs}/data  # vfl prep table writes <dir>/tables/<role>, vfl psi <dir>/<role>",
        f"  threshold: {threshold}{_comment(why)}",
        "  test_fraction: 0.2  # share of the common customers held out for the final test",
        "  valid_fraction: 0.1  # share of the training rows that picks the best epoch and stops early",
        "parties:",
        *(line for party, port in zip(draft.parties, draft.ports, strict=True)
          for line in _party_lines(draft, party, port)),
        f"model:  # sized for {draft.rows:,} rows by training_defaults in vfl_cli/init_job.py",
        f"  bottom: {model['bottom']}  # each party: an embedding per categorical column and its numeric columns "
        "-> MLP -> cut layer",
        f"  top: {model['top']}  # the leader's head over {whose} cut-layer outputs, joined",
        f"  emb_dim: {model['emb_dim']}  # embedding width per categorical column",
        f"  deep_layers: {model['deep_layers']}  # each bottom's MLP widths",
        f"  cut_dim: {model['cut_dim']}  # values per row that cross the wire",
        f"  top_layers: {model['top_layers']}  # the head's hidden widths",
        "train:",
        f"  epochs: {train['epochs']}  # at most: early stopping ends sooner",
        f"  batch_size: {train['batch_size']}",
        f"  log_every: {train['log_every']}  # steps between log lines, about 4 an epoch",
        f"  deep_optimizer: {_flow(train['deep_optimizer'])}  # Adam",
        f"  early_stopping: {_flow(train['early_stopping'])}  # epochs without a better validation score",
        f"  run_dir: {runs}/train  # checkpoints and metrics.jsonl",
        "tls:",
        f"  ca: {runs}/certs/ca.pem  # made by vfl certs",
        f"serve:  # vfl serve: the {lead.key}'s API for its applications (README: serving)",
        f"  listen: \"127.0.0.1:{free_ports(1)[0]}\"  # HTTPS with the {lead.key}'s certificate "
        "(free when written)",
        "  token_env: VFL_SERVE_TOKEN  # callers send `Authorization: Bearer <token>`; set it where it serves",
    ]
    return "\n".join(lines) + "\n"


def check_out(path: Path, force: bool) -> None:
    """Refuse to overwrite a job without --force, or to write one over a directory."""
    if path.is_dir():
        raise JobError(f"--out {path} is a directory; name the job file, e.g. {path / 'job.yaml'}")
    if path.exists() and not force:
        raise JobError(f"--out {path} exists; pass --force to overwrite it")


def write_job(draft: Draft, path: Path, commands: Sequence[str], force: bool = False) -> str:
    """Render the job, check that it loads, write it to `path`; returns the text. Nothing is written on error."""
    check_out(path, force)
    text = render_job(draft, commands)
    parse_job(yaml.safe_load(text), str(path))  # it must load as written (a failure here is vfl init's bug)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise JobError(f"--out {path}: cannot write it ({exc.strerror})") from exc
    return text
