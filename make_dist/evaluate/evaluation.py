"""The one way in to evaluation: what to score (held-out tables, the paper's
suite, or both), checked before a model loads, scored, and its results out.

    evaluation = Evaluation.from_config(cfg.evaluation).check()
    results = evaluation.run(model, tokenizer)
    results.flat("eval"); results.log(run, step, "eval"); results.summary()

The training run's Trainer, `make-dist eval`, the launcher's checks and a
sweep's check of its metric all go through it; none of them asks which kind
of evaluation it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import EvalConfig
from ..errors import UserError
from ..files import exists
from ..progress import say
from ..tracking import Run
from . import paper
from .report import COUNTS, log_results, table
from .tasks import REPORTED, TaskResult, run_task


@dataclass(frozen=True)
class Evaluation:
    """What is scored: tables {task: table} with their class list and images
    root, and the paper's suite on the authors' data folder (or not)."""

    tables: dict[str, str] = field(default_factory=dict)
    classes: str | None = None
    images_root: str | None = None
    images_anywhere: bool = False
    suite_data: str | None = None  # the paper's suite when set
    concept_terms: str | None = None
    batch_size: int = 64

    @classmethod
    def from_config(cls, ev: EvalConfig) -> Evaluation:
        return cls(ev.tables(), ev.classes, ev.images_root, ev.images_anywhere,
                   ev.suite_data if ev.suite else None, ev.concept_terms)

    def __bool__(self) -> bool:
        return bool(self.tables or self.suite_data)

    def check(self, config_keys: bool = True) -> Evaluation:
        """Everything that can be checked before a model loads: the tables and
        class list exist, the suite's folder holds some of its sets, its
        concept terms are readable. Returns it with the terms resolved to the
        file every process reads (and says when they are not the authors').
        config_keys: errors name the config's keys (evaluation.*), else the
        command's options."""
        key = "evaluation." if config_keys else ""
        for task, path in self.tables.items():
            name = f"evaluation.{task}_table" if config_keys else "--table"
            if not exists(path, name):
                raise UserError(f"{name}: {path} does not exist")
        if self.classes and not exists(self.classes, f"{key}classes" if config_keys else "--classes"):
            raise UserError(f"{key + 'classes' if config_keys else '--classes'}: {self.classes} does not exist")
        if not self.suite_data:
            return self
        try:
            paper.check_data(self.suite_data)
        except UserError as e:
            raise UserError(f"{key}suite_data: {e}" if key else str(e)) from None
        try:
            terms = paper.concept_terms(self.suite_data, self.concept_terms)
        except UserError as e:
            raise UserError(f"{key}concept_terms: {e}" if key else str(e)) from None
        if not terms.authors:
            option = "evaluation.concept_terms =" if config_keys else "--concept-terms"
            say(f"the paper's suite: SkinCon and Derm7pt are scored with {terms.describe()}, not comparable with "
                f"the paper's row; " + paper.how_to_get_authors_terms(option))
        return self if terms.source == paper.MAKE_DIST_TERMS else replace(self, concept_terms=terms.source)

    def metric_names(self) -> list[str]:
        """`<task>/<metric>` of what a run reports of it, and the suite's
        averages as `paper/<average>` (a sweep optimises one of them); the
        suite's per-set metrics are `paper/<set>/<metric>`."""
        names = [f"{task}/{metric}" for task in self.tables for metric in REPORTED[task]]
        return names + ([f"paper/{average}" for average in paper.AVERAGES] if self.suite_data else [])

    def reports(self, name: str) -> bool:
        """Whether `name` (without the eval/ prefix) is a metric this evaluation reports."""
        return name in self.metric_names() or (bool(self.suite_data) and name.startswith("paper/")
                                               and name.count("/") == 2)

    def run(self, model, tokenizer, say=say) -> Results:
        """Every table and the suite's sets, scored with the model. say:
        the suite's progress lines (None: quiet)."""
        model.eval()
        tasks = [run_task(task, model, tokenizer, path, self.images_root, self.classes, self.images_anywhere)
                 for task, path in self.tables.items()]
        suite = (paper.run_suite(model, tokenizer, self.suite_data, self.concept_terms, self.batch_size,
                                 say=say or (lambda _: None)) if self.suite_data else [])
        return Results(tasks, suite)


@dataclass
class Results:
    """What an evaluation scored: a TaskResult a table, a SetResult a set of the suite."""

    tasks: list[TaskResult]
    suite: list[paper.SetResult]

    def flat(self, prefix: str = "eval") -> dict[str, float]:
        """`<prefix>/<task>/<metric>` and `<prefix>/paper/...`: what a launcher
        reports and a sweep compares (per-class detail left out)."""
        out = {f"{prefix}/{r.task}/{k}": v for r in self.tasks for k, v in r.metrics.items() if "/" not in k}
        out.update(paper.flat_metrics(self.suite, _suite_prefix(prefix)))
        return out

    def log(self, run: Run, step: int = 0, prefix: str = "eval") -> None:
        """Metrics, count tags, plots and the results JSON on an MLflow run:
        a table's under `<prefix>/<task>`, the suite's under `<prefix>/paper`
        (`paper` alone with no prefix, as `make-dist eval --suite` logs it)."""
        if self.tasks:
            log_results(run, self.tasks, step, prefix)
        if self.suite:
            paper.log_suite(run, self.suite, step, prefix=_suite_prefix(prefix))

    def summary(self) -> str:
        """One line: each table's headline metrics, the suite's averages and
        what keeps them from the paper's protocol to the letter."""
        parts = [f"{r.task} " + " ".join(f"{k} {v:.3f}" for k, v in r.metrics.items() if "/" not in k
                                         and k not in COUNTS) for r in self.tasks]
        parts += [f"paper {k} {v:.3f}" for k, v in paper.averages(self.suite).items()]
        notes = paper.caveats(self.suite)
        return "  ".join(parts) + (f" ({'; '.join(notes)})" if notes else "")

    def printout(self, label: str) -> str:
        """The tables a person reads: make-dist's side-by-side table and the
        paper's Table 1 and Table 2, with what was skipped."""
        out = []
        if self.tasks:
            out.append(table({label: self.tasks}))
            out += [f"{r.task}: skipped {len(r.skipped)} rows, first: row {r.skipped[0]['row']} "
                    f"{r.skipped[0]['image']}: {r.skipped[0]['reason']}" for r in self.tasks if r.skipped]
        if self.suite:
            out.append(paper.tables(self.suite, label))
        return "\n".join(out)

    def to_json(self, label: str) -> dict:
        """The results file: the suite's report (docs/evaluation.md), or
        {label: [task results]} for tables (the suite's then under "paper")."""
        if self.suite and not self.tasks:
            return paper.to_json(self.suite)
        out = {label: [r.to_json() for r in self.tasks]}
        if self.suite:
            out["paper"] = paper.to_json(self.suite)
        return out

    def failed(self) -> list[str]:
        """The suite's sets stopped by an error in their files."""
        return [r.benchmark.name for r in self.suite if r.status == "error"]

    def concept_terms(self) -> str:
        return ", ".join(sorted({r.concept_terms for r in self.suite if r.concept_terms})) or "(none)"


def _suite_prefix(prefix: str) -> str:
    return f"{prefix}/paper" if prefix else "paper"
