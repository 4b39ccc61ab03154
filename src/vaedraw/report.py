"""One page comparing evaluated runs side by side: `vaedraw report RUN_DIR [RUN_DIR ...] --out report.md|.html`.

The figures come from each run's `eval.json` (`EVAL_NAME`), which `vaedraw eval RUN_DIR` writes: the
`evaluate.evaluate_run` dict, the same as `--json`. The page holds the figures with their uncertainty
(likelihoods +- their standard error over the test images, the FD with its bootstrap interval), whether
each run's likelihoods are comparable and why not, the protocol, the machine each evaluation ran on and
the libraries the run was trained with (the checkpoint header), and each run's `samples.png` and
`curves.png`. Markdown links the pictures relative to the report and keeps its tables readable as plain
text; HTML embeds them as base64 data URIs, so the page is one self-contained file.

A run without `eval.json` is refused with the command that makes it; `evaluate_missing` (`--eval`) runs
a quick evaluation (`QUICK_EVAL`, stated on the page as the protocol) for such runs instead.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, atomic_write_text, read_header
from .errors import CheckpointError, VaedrawError
from .evaluate import plus_minus
from .outputs import show

EVAL_NAME = "eval.json"  # what `vaedraw eval` saves in the run directory and the report reads
QUICK_EVAL = {"iwae_k": 100, "n_samples": 2000, "n_images": 1000}  # --eval: minutes on a CPU, not paper figures
PICTURES = (("samples", "samples.png", "samples"), ("curves", "curves.png", "training curves"))
KINDS = (".md", ".html")  # the report's formats, chosen by the extension of --out


# ----------------------------------------------------------------------------- eval.json
def eval_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EVAL_NAME


def save_eval(run_dir: str | os.PathLike, result: dict) -> Path:
    """Write an `evaluate_run` result to RUN_DIR/eval.json atomically (readers see the old file or the new)."""
    path = eval_path(run_dir)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


def read_eval(run_dir: str | os.PathLike) -> dict:
    """RUN_DIR/eval.json as a dict. Missing: a VaedrawError with the command that writes it; damaged: a
    CheckpointError naming the file."""
    path = eval_path(run_dir)
    if not path.is_file():
        raise VaedrawError(f"{show(path)} does not exist; evaluate the run first with `vaedraw eval "
                           f"{show(run_dir)}`, or add --eval for a quick evaluation")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{show(path)} is not readable JSON ({e}); rerun `vaedraw eval {show(run_dir)}`") \
            from None
    if not isinstance(result, dict) or "elbo" not in result:
        raise CheckpointError(f"{show(path)} does not hold `vaedraw eval` figures; rerun "
                              f"`vaedraw eval {show(run_dir)}`")
    return result


def check_runs(run_dirs: list[Path], evaluate: bool = False) -> None:
    """Refuse, before any work, run directories that do not exist and (unless `evaluate`) runs without eval.json,
    naming all of them and the commands that evaluate them."""
    missing = [d for d in run_dirs if not d.is_dir()]
    if missing:
        raise VaedrawError(f"run directory {', '.join(show(d) for d in missing)} does not exist")
    unevaluated = [d for d in run_dirs if not eval_path(d).is_file()]
    if unevaluated and not evaluate:
        commands = "; ".join(f"`vaedraw eval {show(d)}`" for d in unevaluated)
        raise VaedrawError(f"no {EVAL_NAME} in {', '.join(show(d) for d in unevaluated)}: the report reads the "
                           f"figures `vaedraw eval` saves there; run {commands} first, or add --eval for a quick "
                           "evaluation")


def evaluate_missing(run_dirs: list[Path], device: str = "auto", data_dir=None, progress: bool = True,
                     **sizes) -> list[Path]:
    """Evaluate, with QUICK_EVAL's sizes (overridden by `sizes`), each run that has no eval.json, and save it
    there. -> the runs evaluated."""
    from .evaluate import evaluate_run
    from .run import load_run

    done = []
    for run_dir in run_dirs:
        if eval_path(run_dir).is_file():
            continue
        result = evaluate_run(load_run(run_dir, device), data_dir=data_dir, progress=progress,
                              **{**QUICK_EVAL, **sizes})
        save_eval(run_dir, result)
        done.append(run_dir)
    return done


# ----------------------------------------------------------------------------- the runs on the page
@dataclass
class Entry:
    """One run's column: its directory, header, figures, training header (or None) and notes."""

    run_dir: Path
    name: str
    result: dict
    header: dict | None
    notes: list[str] = field(default_factory=list)


def _names(run_dirs: list[Path]) -> list[str]:
    """Column headers: the folder names, with more of the path where two would read the same."""
    parts = [d.resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return [show(n) for n in names]
    return [f"{show(n)} ({i + 1})" for i, n in enumerate(names)]


def load_entries(run_dirs: list[Path]) -> list[Entry]:
    """The report's runs, in the order given: eval.json and the checkpoint's header of each."""
    entries = []
    for run_dir, name in zip(run_dirs, _names(run_dirs)):
        result = read_eval(run_dir)
        try:
            header = read_header(run_dir / CHECKPOINT_NAME)
        except CheckpointError:
            header = None  # the figures stand on their own; the page says the training record is missing
        entry = Entry(run_dir, name, result, header)
        if header is None:
            entry.notes.append(f"no readable {CHECKPOINT_NAME}: training versions unknown")
        elif header.get("step") != result.get("step"):
            entry.notes.append(f"{EVAL_NAME} is of step {result.get('step')}, the checkpoint is at step "
                               f"{header.get('step')}: rerun `vaedraw eval {show(run_dir)}`")
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- the page, format-free
def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _pm(r: dict, key: str, digits: int = 2) -> str:
    return "n/a" if r.get(key) is None else plus_minus(r[key], r.get(f"{key}_se"), digits)


def _fd(q: dict | None) -> str:
    if not q:
        return "n/a"
    ci = q.get("fd_ci")
    return _num(q["fd"]) + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def _share(q: dict | None, key: str) -> str:
    return "n/a" if not q or q.get(key) is None else plus_minus(q[key], q.get(f"{key}_se"), 3)


def _bootstrap(entries: list[Entry]) -> str:
    """How the FD intervals were made, for the row's name: one description when every run agrees."""
    specs = [(e.result.get("samples") or {}).get("fd_bootstrap") for e in entries]
    if all(b is None for b in specs):
        return "no interval"
    kinds = {None if b is None else (b["level"], b["n"]) for b in specs}
    if len(kinds) == 1:
        return f"{specs[0]['level']:.0%} bootstrap interval, B={specs[0]['n']}"
    return "bootstrap interval where given"


def figures_table(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the figures: one row per figure, one column per run."""
    rs = [e.result for e in entries]
    rows = [
        ["preset / data set", *[f"{r.get('preset')} / {r.get('dataset')}" for r in rs]],
        ["step", *[f"{r['step']:,}" if isinstance(r.get("step"), int) else "n/a" for r in rs]],
        ["likelihood", *[str(r.get("likelihood")) for r in rs]],
        ["images N (split)", *[f"{r.get('n_images', 0):,} ({r.get('split')})" for r in rs]],
        ["ELBO, nats (higher is better)", *[_pm(r, "elbo") for r in rs]],
        ["IWAE bound L_k, nats", *[_pm(r, "iwae") for r in rs]],
        ["k (IWAE samples per image)", *[f"{r['iwae_k']:,}" if r.get("iwae_k") else "n/a" for r in rs]],
        ["ELBO, bits/dim (lower is better)", *[_pm(r, "elbo_bpd", 4) for r in rs]],
        ["IWAE bound, bits/dim", *[_pm(r, "iwae_bpd", 4) for r in rs]],
        ["recon / KL, nats", *[f"{_num(r.get('recon'))} / {_num(r.get('kl'))}" for r in rs]],
        ["active units", *[str(r.get("active_units", "n/a")) for r in rs]],
        ["samples (sampler, n)", *[f"{s['sampler']}, {s['n']:,}" if (s := r.get("samples")) else "n/a" for r in rs]],
        [f"FD of samples [{_bootstrap(entries)}]", *[_fd(r.get("samples")) for r in rs]],
        ["FD of reconstructions", *[_fd(r.get("reconstructions")) for r in rs]],
        ["FD floor (real train vs test)", *[_num(r.get("fd_floor")) for r in rs]],
        ["recognizable samples", *[_share(r.get("samples"), "recognizable") for r in rs]],
    ]
    if any("label_accuracy_mean" in (r.get("samples") or {}) for r in rs):
        rows.append(["label accuracy of samples", *[_share(r.get("samples"), "label_accuracy_mean") for r in rs]])
    rows.append(["comparable likelihoods", *["yes" if r.get("comparable") else "NO (see below)" for r in rs]])
    return ["figure", *[e.name for e in entries]], rows


def label_table(entries: list[Entry]) -> tuple[list[str], list[list[str]]] | None:
    """Per requested class, the share of a conditional run's samples the evaluator gives that class."""
    accs = [(e.result.get("samples") or {}).get("label_accuracy") for e in entries]
    if not any(accs):
        return None
    classes = sorted({c for a in accs if a for c in a}, key=lambda c: (len(c), c))
    rows = [[c, *["n/a" if not a or c not in a else f"{a[c]:.3f}" for a in accs]] for c in classes]
    return ["requested class", *[e.name for e in entries]], rows


PROTOCOL_KEYS = (("dataset", "data set"), ("likelihood", "likelihood"), ("split", "split"),
                 ("n_images", "images"), ("iwae_k", "k"), ("seed", "seed"))


def protocol_differences(entries: list[Entry]) -> list[str]:
    """What differs between the runs' evaluations, one line per difference: figures across them do not compare."""
    lines = []
    for key, what in PROTOCOL_KEYS:
        values = [e.result.get(key) for e in entries]
        if len(set(map(json.dumps, values))) > 1:
            lines.append(f"{what} differs: " + ", ".join(f"{e.name} {v}" for e, v in zip(entries, values)))
    samplers = [(e.result.get("samples") or {}).get("n") for e in entries]
    if len(set(samplers)) > 1:
        lines.append("generated images judged differ: " + ", ".join(f"{e.name} {n}" for e, n in zip(entries, samplers)))
    if len({e.result.get("likelihood") for e in entries}) > 1:
        lines.append("the likelihoods differ: never compare nats or bits/dim across likelihoods")
    return lines


def machine_table(entries: list[Entry]) -> tuple[list[str], list[list[str]]]:
    """Where each evaluation ran (eval.json's machine) and what each run was trained with (checkpoint header)."""
    def m(e: Entry, key: str) -> str:
        value = (e.result.get("machine") or {}).get(key)
        return "n/a" if value is None else str(value)

    def v(e: Entry, key: str) -> str:
        return str(((e.header or {}).get("versions") or {}).get(key, "n/a"))

    rows = [
        ["evaluated on", *[f"{m(e, 'device_name')} ({e.result.get('device', 'n/a')})" for e in entries]],
        ["CPU, torch threads", *[f"{m(e, 'cpu')}, {m(e, 'threads')}" for e in entries]],
        ["torch / CUDA (eval)", *[f"{m(e, 'torch')} / {m(e, 'cuda')}" for e in entries]],
        ["python, vaedraw (eval)", *[f"{m(e, 'python')}, {m(e, 'vaedraw')}" for e in entries]],
        ["torch, vaedraw (training)", *[f"{v(e, 'torch')}, {v(e, 'vaedraw')}" for e in entries]],
        ["checkpoint saved", *[str((e.header or {}).get("saved_at", "n/a")) for e in entries]],
        ["eval seconds (ELBO / IWAE / quality)",
         *[" / ".join(_num(e.result.get("seconds", {}).get(k), 1) for k in ("elbo", "iwae", "quality"))
           for e in entries]],
    ]
    return ["", *[e.name for e in entries]], rows


# ----------------------------------------------------------------------------- rendering
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table padded to its columns' widths, so it reads as a table in plain text too. Numbers,
    intervals and 'n/a' are right-aligned; text left."""
    cells = [[_cell(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]
    right = [i > 0 for i in range(len(header))]
    out = []
    for j, row in enumerate(cells):
        out.append("| " + " | ".join(c.rjust(w) if right[i] and j else c.ljust(w)
                                     for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if j == 0:
            out.append("| " + " | ".join(("-" * (w - 1) + ":") if right[i] else "-" * w
                                         for i, w in enumerate(widths)) + " |")
    return "\n".join(out)


def _link(path: Path, base: Path) -> str:
    """`path` relative to the report's folder, with forward slashes (absolute when no relative path exists)."""
    try:
        rel = os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        rel = str(path.resolve())
    rel = Path(rel).as_posix()
    return f"<{rel}>" if any(c in rel for c in " ()<>") else rel


def _sections(entries: list[Entry]) -> list[tuple[str, list[tuple]]]:
    """The page as (title, blocks); a block is ("table", header, rows), ("text", str), ("list", [str]) or
    ("picture", run name, what, path (None when missing), the path looked for)."""
    figures = [("table", *figures_table(entries)),
               ("text", "+- is the standard error of the mean over the N test images (std / sqrt(N)). [lo, hi] "
                        "is how much the FD varies over generated sets of the same size: the spread of the FDs "
                        "of bootstrap resamples of the generated images' features (the reference fixed), placed "
                        "around the point. FD depends on the number of generated images: compare it at equal n "
                        "(docs/EVALUATION.md).")]
    differences = protocol_differences(entries)
    if differences:
        figures.append(("list", ["note: " + d for d in differences]))
    labels = label_table(entries)
    if labels:
        figures += [("text", "Label accuracy per requested class (share of a conditional run's samples that the "
                             "evaluator gives the requested class):"), ("table", *labels)]
    comparable = [f"{e.name}: " + ("comparable with published figures of the same likelihood on this test set"
                                   if e.result.get("comparable") else
                                   f"NOT comparable: {e.result.get('comparable_reason') or 'reason not recorded'}")
                  for e in entries]
    protocol = []
    for e in entries:
        r, s = e.result, e.result.get("samples") or {}
        b = s.get("fd_bootstrap")
        protocol.append(
            f"{e.name} ({show(e.run_dir)}): {r.get('protocol', 'n/a')}; IWAE k={r.get('iwae_k')}, "
            f"seed {r.get('seed', 'n/a')}; "
            + (f"{s['n']:,} samples from the {s['sampler']} sampler; " if s else "")
            + (f"FD interval: the {b['level']:.0%} spread of {b['n']} bootstrap resamples (seed {b['seed']}), "
               + (f"whose median sat {b['shift']:+.2f} from the point; " if b.get("shift") is not None else "; ")
               if b else "FD without an interval; ")
            + (r.get("quality_note") or "no sample-quality figures")
            + "".join(f"; note: {n}" for n in e.notes))
    sections = [("Figures", figures), ("Comparability", [("list", comparable)]), ("Protocol", [("list", protocol)]),
                ("Machine", [("table", *machine_table(entries))])]
    for _, name, what in PICTURES:
        sections.append((what[0].upper() + what[1:],
                         [("picture", e.name, what, p if (p := e.run_dir / name).is_file() else None, e.run_dir / name)
                          for e in entries]))
    return sections


def render_markdown(entries: list[Entry], out: Path) -> str:
    from . import __version__

    lines = [f"# vaedraw report: {len(entries)} run{'s' * (len(entries) != 1)}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S %z')} by vaedraw {__version__} from each run's "
             f"{EVAL_NAME}.", ""]
    for title, blocks in _sections(entries):
        lines += [f"## {title}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "table":
                lines += [markdown_table(block[1], block[2]), ""]
            elif kind == "text":
                lines += [block[1], ""]
            elif kind == "list":
                lines += [f"- {item}" for item in block[1]] + [""]
            else:
                _, name, what, path, wanted = block
                lines += [f"### {name}", "",
                          f"![{what} of {name}]({_link(path, out.parent)})" if path is not None
                          else f"(no {show(wanted.name)} in {show(wanted.parent)})", ""]
    return "\n".join(lines).rstrip() + "\n"


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px}"
          "td{text-align:right;font-variant-numeric:tabular-nums}td:first-child{text-align:left}"
          "th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated}")


def render_html(entries: list[Entry]) -> str:
    """The page as one HTML file: no outside reference, pictures as data URIs."""
    from . import __version__

    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>vaedraw report: {len(entries)} runs</title><style>{_STYLE}</style></head><body>",
             f"<h1>vaedraw report: {len(entries)} run{'s' * (len(entries) != 1)}</h1>",
             f"<p>Written {esc(time.strftime('%Y-%m-%d %H:%M:%S %z'))} by vaedraw {esc(__version__)} "
             f"from each run's {EVAL_NAME}.</p>"]
    for title, blocks in _sections(entries):
        parts.append(f"<h2>{esc(title)}</h2>")
        for block in blocks:
            kind = block[0]
            if kind == "table":
                head = "".join(f"<th>{esc(c)}</th>" for c in block[1])
                body = "".join("<tr>" + "".join(f"<td>{esc(c).replace(' +- ', ' &plusmn; ')}</td>" for c in row)
                               + "</tr>" for row in block[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "text":
                parts.append(f"<p>{esc(block[1])}</p>")
            elif kind == "list":
                parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
            else:
                _, name, what, path, wanted = block
                parts.append(f"<h3>{esc(name)}</h3>")
                if path is None:
                    parts.append(f"<p>(no {esc(show(wanted.name))} in {esc(show(wanted.parent))})</p>")
                else:
                    data = base64.b64encode(path.read_bytes()).decode("ascii")
                    parts.append(f'<img alt="{esc(what)} of {esc(name)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Read each run's eval.json (and checkpoint header) and write the comparison page to `out`, markdown or
    HTML by its extension, atomically. -> out."""
    out = Path(out)
    dirs = [Path(d) for d in run_dirs]
    check_runs(dirs)
    entries = load_entries(dirs)
    if out.suffix.lower() == ".html":
        text = render_html(entries)
    else:
        text = render_markdown(entries, out)
    atomic_write_text(out, text)
    return out
