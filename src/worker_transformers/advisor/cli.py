"""python -m worker_transformers.advisor: a workload and a model in, RunPod endpoint settings out.

    python -m worker_transformers.advisor --requests-per-minute 6 --request-seconds 30 [--peak-concurrency 10]
        [--model ID_OR_FOLDER] [--revision REV] [--private] [--coldstart-json PATH] [--jobs-per-worker 1]
        [--dtype D] [--max-concurrency N] [--max-input-tokens N] [--max-new-tokens N] [--json]

It prints a table with the reason for each setting, or with --json one object. The model defaults to
MODEL_NAME and the sizes to the worker's settings in this environment, so the advice is for the endpoint you
would deploy from here. A bad argument is reported in one line and exits with code 2. Light: no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path

from worker_transformers.advisor import plan
from worker_transformers.advisor.footprint import FootprintError, footprint
from worker_transformers.advisor.model_facts import ModelFacts, ModelFactsError, find
from worker_transformers.config import DTYPES, ConfigError, Settings

PROG = "python -m worker_transformers.advisor"
MAX_READY_S = 43_200  # a cold start measured past 12 hours is a broken measurement, not a number to act on


class UsageError(ValueError):
    """An argument the advisor cannot use. The message names the option and the fix."""


def _setting_parser(env: str, option: str | None = None):
    """A Settings parser as an argparse type, so the option accepts exactly what the variable accepts."""
    parse = next(f.metadata["parse"] for f in fields(Settings) if f.metadata.get("env") == env)
    option = option or "--" + env.lower().replace("_", "-")

    def argument(raw: str):
        try:
            return parse(option, raw)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return argument


def _positive(kind: type):
    def argument(raw: str):
        try:
            value = kind(raw)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{raw!r} is not {what}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{raw!r} must be above 0")
        return value

    return argument


def _model(raw: str) -> str:
    if Path(raw).expanduser().is_dir():
        return raw
    return _setting_parser("MODEL_NAME", "--model")(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} --requests-per-minute N --request-seconds S [options]",
        description="Endpoint settings for a workload: workers, queue delay, GPU pools, init timeout, model source.",
    )
    workload = parser.add_argument_group("workload")
    workload.add_argument("--requests-per-minute", type=_positive(float), required=True, metavar="N")
    workload.add_argument(
        "--request-seconds", type=_positive(float), required=True, metavar="S",
        help="seconds one request runs: the average executionTime / 1000",
    )  # fmt: skip
    workload.add_argument(
        "--peak-concurrency", type=_positive(float), metavar="N", help="jobs in flight at the busiest moment"
    )
    workload.add_argument(
        "--jobs-per-worker", type=_positive(int), default=1, metavar="N",
        help="jobs one worker serves at once within your latency target (at most MAX_CONCURRENCY; measure it "
        "with make bench-serve); 1, the checklist's assumption, by default",
    )  # fmt: skip
    model = parser.add_argument_group("model (defaults: this environment's worker settings)")
    model.add_argument("--model", type=_model, metavar="ID_OR_FOLDER", help="a Hugging Face model id or a folder")
    model.add_argument("--revision", metavar="REV")
    model.add_argument("--private", action="store_true", help="the model is private or gated on the Hub")
    model.add_argument("--dtype", choices=DTYPES)
    model.add_argument("--max-concurrency", type=_setting_parser("MAX_CONCURRENCY"), metavar="N")
    model.add_argument("--max-input-tokens", type=_setting_parser("MAX_INPUT_TOKENS"), metavar="N")
    model.add_argument("--max-new-tokens", type=_setting_parser("MAX_NEW_TOKENS"), metavar="N")
    parser.add_argument(
        "--coldstart-json", type=Path, metavar="PATH",
        help="the cold-start benchmark's JSON; its ready_s sets RUNPOD_INIT_TIMEOUT",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def read_ready_s(path: Path) -> float:
    """The measured cold start (`ready_s`) from the benchmark's JSON. Raises UsageError with the fix."""
    try:
        report = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"--coldstart-json {path}: cannot read it ({error.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"--coldstart-json {path}: not JSON; pass the file the cold-start benchmark wrote") from None
    ready = report.get("ready_s") if isinstance(report, dict) else None
    if isinstance(ready, bool) or not isinstance(ready, (int, float)) or not 0 < ready <= MAX_READY_S:
        raise UsageError(
            f"--coldstart-json {path}: needs a top-level ready_s, the seconds from start to ready (0 to "
            f"{MAX_READY_S}); got {ready!r}"
        )
    return float(ready)


def advise(
    args: argparse.Namespace, settings: Settings, facts: ModelFacts, ready_s: float | None
) -> list[plan.Setting]:
    average = plan.jobs_in_flight(args.requests_per_minute, args.request_seconds)
    active = plan.active_workers(args.requests_per_minute, args.request_seconds, args.jobs_per_worker)
    tokens_per_job = args.max_input_tokens + args.max_new_tokens
    need = footprint(facts.shape, args.dtype, args.max_concurrency, args.max_input_tokens, args.max_new_tokens)
    return [
        active,
        plan.max_workers(args.peak_concurrency, average, active.value, args.jobs_per_worker),
        plan.queue_delay(average, args.peak_concurrency),
        plan.gpu_pools(need, args.max_concurrency, tokens_per_job),
        plan.init_timeout(ready_s, settings.init_timeout_s),
        plan.model_source(facts.shape.stored_bytes, facts.on_hub, facts.private),
    ]


def table(rows: Sequence[plan.Setting]) -> str:
    lines = [("setting", "value", "why"), *((r.label, r.shown, r.reason) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in lines)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    args = build_parser().parse_args(argv)  # a malformed option: argparse prints the usage and exits 2
    try:
        settings = Settings.from_env(env)
        _fill_from_settings(args, settings)
        _check_workload(args)
        ready_s = read_ready_s(args.coldstart_json) if args.coldstart_json else None
        facts = find(args.model, args.revision, settings, args.private)
        rows = advise(args, settings, facts, ready_s)
    except (ConfigError, UsageError, ModelFactsError, FootprintError) as error:  # the user's to fix: one line
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

    if args.json:
        report = {row.key: row.value for row in rows}
        report["reasons"] = {row.key: row.reason for row in rows}
        report["model"] = {"name": args.model, "found": facts.found, "stored_bytes": facts.shape.stored_bytes}
        print(json.dumps(report, indent=2))
    else:
        print(f"model {args.model}: {facts.found}")
        print(table(rows))
    return 0


def _fill_from_settings(args: argparse.Namespace, settings: Settings) -> None:
    """Unset options take the values the worker would run with in this environment."""
    args.model = args.model or settings.model_name
    args.revision = args.revision or (settings.model_revision if args.model == settings.model_name else None)
    args.dtype = args.dtype or settings.dtype
    for name in ("max_concurrency", "max_input_tokens", "max_new_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(settings, name))


def _check_workload(args: argparse.Namespace) -> None:
    average = plan.jobs_in_flight(args.requests_per_minute, args.request_seconds)
    if args.peak_concurrency is not None and args.peak_concurrency < average:
        raise UsageError(
            f"--peak-concurrency {args.peak_concurrency:g} is below the average of {average:.2f} jobs in flight "
            f"({args.requests_per_minute:g}/min x {args.request_seconds:g} s / 60); the peak is at least the average"
        )
    if args.jobs_per_worker > args.max_concurrency:
        raise UsageError(
            f"--jobs-per-worker {args.jobs_per_worker} is more than MAX_CONCURRENCY={args.max_concurrency}, the most "
            "a worker takes at once; lower it or raise --max-concurrency"
        )

