"""`stagediff compare RUN_A RUN_B`: how two scored runs differ, per setting (grid point) and per prompt,
and a chart of score against the swept value with one line per run. Reads manifests only (light core)."""

from __future__ import annotations

from dataclasses import dataclass

from stagediff.charts import line_chart_png
from stagediff.errors import StagediffError
from stagediff.manifest import RunManifest
from stagediff.scoring import summarize


@dataclass(frozen=True)
class Comparison:
    scorer: str
    runs: tuple[RunManifest, RunManifest]
    points: list[dict]
    """Per grid point (by its swept values): label, values, mean of each run (None: not in that run), difference."""
    prompts: list[dict]
    """Per prompt: mean of each run over its seeds and grid points, difference (B − A)."""

    def text(self) -> str:
        a, b = (run.title for run in self.runs)
        lines = [f"{self.scorer} score: A = {a}, B = {b}", "", f"{'setting':32s} {'A':>9s} {'B':>9s} {'B-A':>9s}"]
        lines += [f"{row['label'][:32]:32s} {_cell(row['a'])} {_cell(row['b'])} {_cell(row['difference'])}"
                  for row in self.points]
        lines += ["", f"{'prompt':32s} {'A':>9s} {'B':>9s} {'B-A':>9s}"]
        lines += [f"{row['prompt'][:32]:32s} {_cell(row['a'])} {_cell(row['b'])} {_cell(row['difference'])}"
                  for row in self.prompts]
        return "\n".join(lines)

    def chart_png(self) -> bytes:
        """Score against the swept value (one line per run); grid points in order where the runs sweep
        several values at once or nothing."""
        names = list(dict.fromkeys(name for row in self.points for name in row["values"]))
        numeric = len(names) == 1 and all(isinstance(row["values"].get(names[0]), (int, float)) for row in self.points)
        order = {row["label"]: number for number, row in enumerate(self.points)}
        series = {}
        for side, run in zip("ab", self.runs):
            series[run.title] = [(float(row["values"][names[0]]) if numeric else float(order[row["label"]]), row[side])
                                 for row in self.points if row[side] is not None]
        ticks = None if numeric else {float(number): label for label, number in order.items()}
        return line_chart_png(series, title=f"{self.scorer} score: {' vs '.join(run.title for run in self.runs)}",
                              x_label=names[0] if numeric else "setting", y_label=f"mean {self.scorer} score",
                              x_ticks=ticks)


def compare_runs(first: RunManifest, second: RunManifest, scorer: str | None = None) -> Comparison:
    """The per-setting and per-prompt differences of two runs' scores (one scorer)."""
    summaries = [summarize(run.manifest) for run in (first, second)]
    shared = [name for name in summaries[0] if name in summaries[1]]
    if scorer is None:
        if not shared:
            raise StagediffError(f"runs {first.title} and {second.title} have no scorer in common "
                                 "(generate them with --score)")
        scorer = shared[0]
    for run, summary in zip((first, second), summaries):
        if scorer not in summary:
            raise StagediffError(f"--scorer {scorer}: run {run.title} has no {scorer} scores")
    by_label = [{point["label"]: point for point in summary[scorer]} for summary in summaries]
    labels = list(dict.fromkeys([*by_label[0], *by_label[1]]))
    points = []
    for label in labels:
        a, b = (side.get(label) for side in by_label)
        values = (a or b)["values"]
        means = [point["mean"] if point else None for point in (a, b)]
        points.append({"label": label, "values": values, "a": means[0], "b": means[1],
                       "difference": _difference(*means)})
    prompt_means = [_prompt_means(run.manifest, scorer) for run in (first, second)]
    prompts = [{"prompt": prompt, "a": prompt_means[0].get(prompt), "b": prompt_means[1].get(prompt),
                "difference": _difference(prompt_means[0].get(prompt), prompt_means[1].get(prompt))}
               for prompt in dict.fromkeys([*prompt_means[0], *prompt_means[1]])]
    return Comparison(scorer, (first, second), points, prompts)


def _prompt_means(manifest: dict, scorer: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for item in manifest["items"]:
        value = (item.get("scores") or {}).get(scorer)
        if value is not None:
            values.setdefault(item["prompt"], []).append(value)
    return {prompt: sum(v) / len(v) for prompt, v in values.items()}


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _cell(value: float | None) -> str:
    return f"{'-':>9s}" if value is None else f"{value:9.3f}"


