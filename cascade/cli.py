"""The `cascade` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cascade.config import ConfigError
from cascade.data import DataError
from cascade.rulepack import RuleError

USER_ERRORS = (DataError, RuleError, ConfigError, FileNotFoundError)


def _write_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


# --- data ----------------------------------------------------------------------------------


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from cascade.data import prepare

    report = prepare(args.dataset, args.path, args.out, skip_bad=args.skip_bad, text_field=args.text_field,
                     label_field=args.label_field, val_fraction=args.val_fraction,
                     test_fraction=args.test_fraction, seed=args.seed)
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad rows (--skip-bad):", file=sys.stderr)
        for bad in report.skipped[:20]:
            print(f"  {bad}", file=sys.stderr)
    counts = "  ".join(f"{k} {v}" for k, v in report.counts.items())
    print(f"wrote {report.out}: {counts}  ({report.labels} labels)")
    return 0


# --- rules ---------------------------------------------------------------------------------


def cmd_rules_check(args: argparse.Namespace) -> int:
    from cascade.data import load_split
    from cascade.rulecheck import check_pack, format_check
    from cascade.rulepack import load_pack

    pack = load_pack(args.pack)
    report = check_pack(pack, load_split(args.data, args.split), args.timeout_ms / 1000.0)
    report["split"] = args.split
    print(format_check(report))
    if args.json:
        _write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_rules_mine(args: argparse.Namespace) -> int:
    from cascade.data import load_labels, load_split
    from cascade.rulemine import MineConfig, mine_pack, oos_weight_for, write_pack

    labels = load_labels(args.data)
    train = load_split(args.data, "train")
    cfg = MineConfig(min_precision=args.min_precision, max_rules_per_label=args.max_rules_per_label,
                     min_train_support=args.min_support, min_val_support=args.min_val_support,
                     min_ngram=args.min_words,
                     oos_label=labels.oos_label,
                     oos_weight=oos_weight_for(train, labels.oos_label, args.oos_share))
    name = args.name or Path(args.out).stem
    data, report = mine_pack(train, load_split(args.data, "val"), name, cfg)
    write_pack(data, args.out)
    prec = "-" if report["precision"] is None else f"{report['precision']:.4f}"
    print(f"wrote {args.out}: {len(data['rule'])} rules; on val: coverage {report['coverage']:.3f}, "
          f"precision {prec}")
    return 0


# --- eval ----------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from cascade.evaluate import format_report, run_eval

    report = run_eval(args.config, args.data, args.split, baseline=args.baseline,
                      batch_size=args.batch_size, limit=args.limit)
    print(format_report(report))
    if args.json:
        _write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


# --- plan --------------------------------------------------------------------------------


def parse_quantity(text: str) -> float:
    """'1.4T', '70B', '5e6', '300M' -> float."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15}
    t = text.strip().upper()
    try:
        return float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (examples: 1.4T, 70B, 5e6)") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from training.planner import format_plan, plan

    try:
        result = plan(compute=args.compute, tokens=args.tokens, inference_tokens=args.inference_tokens)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    print(json.dumps(result.to_json(), indent=1) if args.json else format_plan(result))
    return 0


# --- quickstart ----------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace) -> int:
    from cascade.quickstart import run_quickstart

    run_quickstart(args.source, args.workdir)
    return 0


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Answer each request with the cheapest tier that is confident enough.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="the main job, end to end, on a built-in task")
    p.add_argument("--source", default="../shared/data/clinc150",
                   help="CLINC150 directory (data_full.json) to build the demo task from")
    p.add_argument("--workdir", default="runs/quickstart", help="where data, rules, config and reports go")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("plan", help="Chinchilla and inference-aware model sizing for a budget")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=parse_quantity, help="training tokens available (e.g. 2M, 1.4T)")
    budget.add_argument("--compute", type=parse_quantity, help="training compute in FLOPs (e.g. 5.9e23)")
    p.add_argument("--inference-tokens", type=parse_quantity, default=0.0,
                   help="tokens the model will process over its serving life")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("prepare", help="turn CLINC150, Banking77 or any CSV/JSONL into a dataset dir")
    p.add_argument("--dataset", required=True, choices=["clinc150", "banking77", "csv", "jsonl"])
    p.add_argument("--path", required=True, help="source file or directory")
    p.add_argument("--out", required=True, help="dataset dir to write")
    p.add_argument("--skip-bad", action="store_true", help="skip rows with empty text or no label (reported)")
    p.add_argument("--text-field", default="text", help="text column (csv/jsonl)")
    p.add_argument("--label-field", default="label", help="label column (csv/jsonl)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train carved for val when missing")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of train carved for test when missing")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_prepare)

    rules = sub.add_parser("rules", help="rule packs").add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    p = rules.add_parser("check", help="per-rule support and precision, coverage, conflicts")
    p.add_argument("pack", help="rule pack .toml")
    p.add_argument("--data", required=True, help="dataset dir")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--timeout-ms", type=float, default=20.0, help="matching budget per text")
    p.set_defaults(func=cmd_rules_check)
    p = rules.add_parser("mine", help="induce high-precision phrase rules from a dataset dir")
    p.add_argument("--data", required=True, help="dataset dir (mines train, validates on val)")
    p.add_argument("--out", required=True, help="rule pack .toml to write")
    p.add_argument("--min-precision", type=float, default=0.99)
    p.add_argument("--min-support", type=int, default=8, help="least train matches per rule")
    p.add_argument("--min-val-support", type=int, default=3, help="least val matches per rule")
    p.add_argument("--min-words", type=int, default=2, help="shortest phrase, in words")
    p.add_argument("--max-rules-per-label", type=int, default=5)
    p.add_argument("--oos-share", type=float, default=0.2,
                   help="expected share of out-of-scope traffic; out-of-scope matches are weighted up to it")
    p.add_argument("--name", help="pack name (default: the file stem)")
    p.set_defaults(func=cmd_rules_mine)

    p = sub.add_parser("eval", help="evaluate a cascade on a labelled split")
    p.add_argument("--config", required=True, help="cascade.toml")
    p.add_argument("--data", required=True, help="dataset dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--json", help="write the report here")
    p.add_argument("--baseline", action="store_true", help="also evaluate the last tier alone")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="first N items only")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
