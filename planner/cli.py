"""The `autopar` command line (DESIGN §6).

Exit codes: 0 ok, 1 infeasible (search.errors.Infeasible) or `check` found a changed plan, 2 bad input
(BadInput and argparse usage errors), 3 internal error (an unexpected exception: "internal error" plus
the traceback on stderr). Autopar errors print ``error: <message>`` on stderr without a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from planner.plan import FIX_CHOICE_KEYS, FIX_KEYS
from search.errors import AutoparError, BadInput


class _UsageError(Exception):
    def __init__(self, code: int):
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of calling sys.exit, so main() returns the code."""

    def exit(self, status: int = 0, message: str | None = None):  # noqa: A003
        if message:
            self._print_message(message, sys.stderr)
        raise _UsageError(status)


def parse_fix(text: str) -> dict[str, int | str]:
    """Parse ``dp=2,tp=4,recompute=none`` into {"dp": 2, "tp": 4, "recompute": "none"}; BadInput if malformed."""
    out: dict[str, int | str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key or not val:
            raise BadInput(f"--fix: malformed item {item!r} (expected key=value, e.g. tp=4)")
        if key not in FIX_KEYS:
            raise BadInput(f"--fix: unknown key {key!r} (known: {', '.join(FIX_KEYS)})")
        if key in out:
            raise BadInput(f"--fix: {key} given twice")
        if key in FIX_CHOICE_KEYS:
            known = FIX_CHOICE_KEYS[key]
            if val not in known:
                raise BadInput(f"--fix: unknown {key} {val!r} (known: {', '.join(known)})")
            out[key] = val
            continue
        try:
            n = int(val)
        except ValueError:
            raise BadInput(f"--fix: {key} must be an integer, got {val!r}") from None
        lo = 0 if key == "zero" else 1
        if n < lo or (key == "zero" and n > 3):
            raise BadInput(f"--fix: {key}={n} out of range ({'0..3' if key == 'zero' else '>= 1'})")
        out[key] = n
    if not out:
        raise BadInput("--fix: empty (expected e.g. dp=2,tp=4)")
    return out


def _int_or_range(text: str) -> int | tuple[int, ...]:
    """``2048`` -> 2048; ``2048..1048576`` -> (2048, 1048576); ``2048..1048576:1024`` -> (2048, 1048576, 1024)."""
    if ".." not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or LO..HI[:STEP], got {text!r}") from None
    lo, _, rest = text.partition("..")
    hi, _, step = rest.partition(":")
    try:
        return tuple(int(x) for x in (lo, hi, *([step] if step else [])))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO..HI or LO..HI:STEP with integers, got {text!r}") from None


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autopar", description="Automatic parallelization planner for PyTorch training.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("models", help="list the model zoo")
    sub.add_parser("clusters", help="list the built-in cluster profiles")

    pl = sub.add_parser("plan", help="search a parallelization plan for MODEL")
    pl.add_argument("model", metavar="MODEL",
                    help="zoo name (see `autopar models`), path/file.py:factory, or hf:<model_type>[:k=v,...]")
    pl.add_argument("--cluster", default="a100-80g", metavar="NAME|FILE",
                    help="built-in cluster name or a cluster JSON file (default: a100-80g)")
    pl.add_argument("--devices", type=int, metavar="N")
    pl.add_argument("--global-batch", type=_int_or_range, metavar="B|LO..HI[:STEP]",
                    help="global batch, or a range to plan piecewise")
    pl.add_argument("--seq", type=_int_or_range, metavar="S|LO..HI[:STEP]",
                    help="sequence length, or a range to plan piecewise (one search for the whole range; "
                         "STEP defaults to the largest power of two <= 128 dividing LO and HI)")
    pl.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    pl.add_argument("--memory-limit", type=float, metavar="GIB", help="per-device memory limit in GiB")
    pl.add_argument("--fix", metavar="dp=..,tp=..,pp=..,sp=..,zero=..,microbatches=..,schedule=..",
                    help="pin decisions; the search fills in the rest")
    pl.add_argument("--no-fold", action="store_true", help="do not fold repeated blocks (slower search)")
    pl.add_argument("--search", choices=("ilp", "enumerate", "ops"), default="ilp",
                    help="ilp: the ILP picks Megatron tensor-parallel cones, with every other lever (default); "
                         "enumerate: the full Megatron pattern (the oracle); ops: Alpa's per-op ILP, every op's "
                         "Replicate/Shard/Partial placement on a dp x tp mesh (no pp/sp/ZeRO/recompute yet)")
    pl.add_argument("--timings", action="store_true", help="record search.seconds (plan JSON is then not reproducible)")
    pl.add_argument("--out", metavar="PLAN.json", help="write the plan JSON here")
    pl.add_argument("--format", choices=("table", "json"), default="table")
    pl.add_argument("--record-case", action="store_true",
                    help="record these inputs in the plan (top-level \"case\") so `check` and `explain --why` "
                         "can re-plan it")

    ex = sub.add_parser("explain", help="explain a plan JSON file")
    ex.add_argument("plan", metavar="PLAN.json")
    ex.add_argument("--why", action="append", metavar="PINS",
                    help="re-plan the recorded case with these extra pins (e.g. 'tp=4') and show what moves; "
                         "repeatable")
    ex.add_argument("--memory-chart", metavar="OUT.png",
                    help="write predicted memory per device (winner and runners-up) as a stacked bar chart")
    ex.add_argument("--timeline", metavar="OUT.png",
                    help="draw the pipeline schedule (ranks × time) simulated from the stages' predicted times")
    ex.add_argument("--range-chart", metavar="OUT.png|OUT.svg",
                    help="draw a range plan's predicted step time and peak memory across S (or B), breakpoints marked")

    ck = sub.add_parser("check", help="re-plan the golden plans and report any decision that moved")
    ck.add_argument("dir", nargs="?", metavar="DIR", help="directory of golden plan JSON (default: tests/golden)")
    ck.add_argument("--update", action="store_true", help="rewrite the golden files that changed")
    ck.add_argument("--jobs", type=int, metavar="N", help="re-plan in N processes (default: one per core)")
    return p


def _print_table(table) -> None:
    from rich.console import Console

    Console(width=110).print(table)


def _cmd_models(args) -> int:
    from rich.table import Table

    from examples.zoo import list_models

    t = Table(title="autopar model zoo", title_justify="left")
    for col in ("name", "family", "description"):
        t.add_column(col)
    for m in list_models():
        get = (lambda k: m.get(k, "")) if isinstance(m, dict) else (lambda k: getattr(m, k, ""))
        t.add_row(str(get("name")), str(get("family")), str(get("description")))
    _print_table(t)
    return 0


def _cmd_clusters(args) -> int:
    from rich.table import Table

    from search.cluster import builtin_names, get_cluster

    t = Table(title="built-in clusters (--cluster NAME)", title_justify="left")
    for col in ("name", "dev/node", "memory", "bf16 TF/s", "fp32 TF/s", "intra GB/s",
                "inter GB/s", "notes"):
        t.add_column(col, justify="left" if col in ("name", "notes") else "right", no_wrap=col == "notes")
    for name in builtin_names():
        try:
            c = get_cluster(name)
        except Exception as e:  # noqa: BLE001 — "cpu" is calibrated lazily; show that rather than fail
            if name == "cpu" or isinstance(e, AutoparError):
                t.add_row(name, "-", "-", "-", "-", "-", "-", "measured on first use" if name == "cpu" else str(e))
                continue
            raise
        peak = dict(getattr(c, "peak_flops", ()) or ())

        def tflops(k):
            return "-" if peak.get(k) is None else f"{peak[k] / 1e12:g}"

        def gbs(v):
            return "-" if v is None else f"{v / 1e9:g}"

        mem = getattr(c, "memory_bytes", None)
        t.add_row(name, str(getattr(c, "devices_per_node", "-")),
                  "-" if mem is None else f"{mem / 1024 ** 3:.0f} GiB", tflops("bf16"), tflops("fp32"),
                  gbs(getattr(c, "intra_bandwidth", None)), gbs(getattr(c, "inter_bandwidth", None)),
                  "measured" if name == "cpu" else "")
    _print_table(t)
    return 0


def _cmd_plan(args) -> int:
    fix = parse_fix(args.fix) if args.fix is not None else {}
    for name in ("devices", "global_batch", "seq"):
        v = getattr(args, name)
        if isinstance(v, tuple):
            continue
        if v is not None and v < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.memory_limit is not None and not args.memory_limit > 0:
        raise BadInput(f"--memory-limit must be > 0 GiB, got {args.memory_limit}")
    from planner.api import make_plan_from_spec

    plan = make_plan_from_spec(
        args.model, cluster=args.cluster, devices=args.devices, global_batch=args.global_batch,
        seq_len=args.seq, dtype=args.dtype, memory_limit_gib=args.memory_limit, fix=fix,
        fold=not args.no_fold, timings=args.timings, search=args.search,
    )
    if args.record_case:
        from planner.check import make_case, with_case

        plan = with_case(plan, make_case(args.model, cluster=args.cluster, devices=args.devices,
                                         global_batch=args.global_batch, seq=args.seq, dtype=args.dtype,
                                         memory_limit_gib=args.memory_limit, fix=fix))
    text = plan.to_json()
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as e:
            raise BadInput(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    if args.format == "json":
        sys.stdout.write(text)
    else:
        sys.stdout.write(plan.explain())
        if args.out:
            sys.stdout.write(f"plan written to {args.out}\n")
    return 0


def _cmd_explain(args) -> int:
    """The plan report, or with --why only the comparisons; --memory-chart / --timeline / --range-chart draw."""
    from planner import check
    from planner.plan import Plan

    plan = Plan.from_json(Path(args.plan))
    pins = [parse_fix(text) for text in args.why or []]
    if not pins:
        sys.stdout.write(plan.explain())
    for fix in pins:
        print("\n".join(check.why(plan, fix)))
    if args.memory_chart:
        check.memory_chart(plan, args.memory_chart)
        print(f"memory chart written to {args.memory_chart}")
    if args.timeline:
        bubble = check.schedule_timeline(plan, args.timeline)
        print(f"schedule timeline written to {args.timeline} (simulated idle, bubble and imbalance: "
              f"{bubble * 100:.1f} %; priced bubble {plan.predicted['bubble_fraction'] * 100:.1f} %)")
    if args.range_chart:
        check.range_chart(plan, args.range_chart)
        print(f"range chart written to {args.range_chart}")
    return 0


def _cmd_check(args) -> int:
    from planner.check import GOLDEN_DIR, check

    if args.jobs is not None and args.jobs < 1:
        raise BadInput(f"--jobs must be >= 1, got {args.jobs}")
    return check(args.dir or GOLDEN_DIR, update=args.update, jobs=args.jobs)


_COMMANDS = {"models": _cmd_models, "clusters": _cmd_clusters, "plan": _cmd_plan, "explain": _cmd_explain,
             "check": _cmd_check}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 infeasible / check failed, 2 bad input/usage, 3 internal error)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        return e.code
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](args)
    except AutoparError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 0
    except Exception:  # noqa: BLE001
        print("internal error (please report this with the command line):", file=sys.stderr)
        traceback.print_exc()
        return 3


if __name__ == "__main__":
    sys.exit(main())
