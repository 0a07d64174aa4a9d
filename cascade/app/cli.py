"""The `cascade` command. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cascade.config import ConfigError
from cascade.data import DataError
from cascade.rules.pack import RuleError

USER_ERRORS = (DataError, RuleError, ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    # Checkpoint errors live in training/, which needs torch: only count them if it is loaded.
    extra = []
    mod = sys.modules.get("training.hf_io")
    if mod is not None:
        extra.append(mod.CheckpointError)
    return USER_ERRORS + tuple(extra)


def _write_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _json_flag(p: argparse.ArgumentParser, what: str) -> None:
    """`--json FILE` means the same on every command: `what` as JSON into FILE; `--json` alone
    (or `--json -`) prints that JSON on stdout instead of the table."""
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help=f"write {what} as JSON to FILE; alone or '-': print it on stdout instead of the table")


def _emit(report: dict, json_to: str | None, table: str) -> None:
    """The table on stdout, or with `--json`/`--json -` the JSON there; with `--json FILE`, both."""
    if json_to == "-":
        print(json.dumps(report, indent=1))
        return
    print(table)
    if json_to:
        _write_json(report, json_to)
        print(f"wrote {json_to}")


# --- data ----------------------------------------------------------------------------------


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from cascade.data import prepare

    report = prepare(args.dataset, args.path, args.out, skip_bad=args.skip_bad, text_field=args.text_field,
                     label_field=args.label_field, val_fraction=args.val_fraction,
                     test_fraction=args.test_fraction, seed=args.seed, task=args.task)
    if report.skipped:
        print(f"skipped {len(report.skipped)} bad rows (--skip-bad):", file=sys.stderr)
        for bad in report.skipped[:20]:
            print(f"  {bad}", file=sys.stderr)
    counts = "  ".join(f"{k} {v}" for k, v in report.counts.items())
    what = f"{report.labels} labels" + (f", {report.fields} fields" if report.task != "classify" else "")
    print(f"wrote {report.out}: {counts}  ({report.task}: {what})")
    return 0


# --- rules ---------------------------------------------------------------------------------


def cmd_rules_check(args: argparse.Namespace) -> int:
    from cascade.data import load_labels, load_split
    from cascade.rules.check import check_pack, format_check
    from cascade.rules.pack import load_pack

    pack = load_pack(args.pack)
    labels = load_labels(args.data) if (Path(args.data) / "labels.json").exists() else None
    task, names = (labels.task, labels.fields) if labels is not None else ("classify", [])
    report = check_pack(pack, load_split(args.data, args.split), args.timeout_ms / 1000.0, task=task,
                        field_names=names)
    report["split"] = args.split
    _emit(report, args.json, format_check(report))
    return 0


def cmd_rules_mine(args: argparse.Namespace) -> int:
    from cascade.data import load_labels, load_split
    from cascade.rules.mine import MineConfig, mine_pack, oos_weight_for, write_pack

    labels = load_labels(args.data)
    train = load_split(args.data, "train")
    extract = labels.task != "classify"
    # Templates are rarer than phrases: an extraction rule needs less support by default.
    min_support = args.min_support if args.min_support is not None else (3 if extract else 8)
    min_val_support = args.min_val_support if args.min_val_support is not None else (1 if extract else 3)
    cfg = MineConfig(min_precision=args.min_precision, max_rules_per_label=args.max_rules_per_label,
                     min_train_support=min_support, min_val_support=min_val_support,
                     min_ngram=args.min_words,
                     oos_label=labels.oos_label,
                     oos_weight=oos_weight_for(train, labels.oos_label, args.oos_share),
                     max_field_values=args.max_field_values)
    name = args.name or Path(args.out).stem
    val = load_split(args.data, "val")
    if extract:
        from cascade.rules.mine import mine_template_pack

        data, report = mine_template_pack(train, val, name, cfg, task=labels.task)
    else:
        data, report = mine_pack(train, val, name, cfg)
    write_pack(data, args.out)
    prec = "-" if report["precision"] is None else f"{report['precision']:.4f}"
    if extract:
        tp = "-" if report["task_precision"] is None else f"{report['task_precision']:.4f}"
        m = report["mining"]
        print(f"wrote {args.out}: {len(data['rule'])} template rules (of {m['templates']} templates seen "
              f">= {min_support}x, {m['passed_train']} precise on train); on val (which selected them): "
              f"coverage {report['coverage']:.3f}, {report['metric']} precision {tp}, label precision {prec}")
        return 0
    print(f"wrote {args.out}: {len(data['rule'])} rules; on val: coverage {report['coverage']:.3f}, "
          f"precision {prec}")
    return 0


# --- eval ----------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from cascade.evaluate import format_report, run_eval, write_reports

    report, items = run_eval(args.config, args.data, args.split, baseline=args.baseline,
                             batch_size=args.batch_size, limit=args.limit, progress=not args.no_progress,
                             seed=args.seed)
    if args.json == "-":
        print(json.dumps(report, indent=1))
        return 0
    print(format_report(report))
    if args.json:
        written = write_reports(report, items, args.json)
        print("wrote " + ", ".join(str(p) for p in written.values() if p is not None))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cascade.calibrate import CalibrationError, run_calibration
    from cascade.progress import per_name

    progress = per_name("measuring", enabled=not args.no_progress)
    label_free, label_free_items = args.label_free, None
    if label_free is not None and Path(label_free).is_dir():  # a traffic log: its audited sample
        from cascade.config import load_config
        from serving.traffic_log import audited_sample

        texts, answers, counts = audited_sample(label_free, load_config(args.config).tiers[-1].name, seed=args.seed)
        print(f"traffic log {label_free}: {counts['audits']} audited items and {counts['escalated_kept']} of "
              f"{counts['escalated']} escalated ones (kept at the audit rate {counts['audit_rate']:.4f}); "
              f"{counts['no_text_skipped']} without text skipped", file=sys.stderr)
        label_free, label_free_items = None, (texts, answers)
    try:
        report = run_calibration(args.config, args.data, args.target_accuracy, args.max_llm_share, args.split,
                                 args.candidates, args.limit, write=not args.dry_run, progress=progress,
                                 confidence=args.confidence, oos_threshold=not args.no_oos_threshold,
                                 oos_share=args.oos_share, max_loss=args.max_loss,
                                 path_split=None if args.path_split == "learn" else args.path_split,
                                 learn_share=args.learn_share, seed=args.seed, label_free=label_free,
                                 label_free_items=label_free_items, label_free_share=args.label_free_share)
    except CalibrationError as exc:
        raise DataError(str(exc)) from exc
    c = report["chosen"]
    print(report["table"])
    if (g := report["guarantee"]) is not None:
        print(f"\nthe test (fixed sequence on {g['test_n']} {args.split} items, path from {g['path_from']}: "
              f"{g['learn_n']} items; {g['method']}):")
        print(report["certificate_table"])
        promise = (f"accuracy >= the last tier's minus {g['level']:g}" if g["goal"] == "llm"
                   else f"accuracy >= {g['level']:.4f}")
        print(f"certified: {promise}, with {g['confidence']:.0%} confidence (docs/calibration.md)")
    print(f"chosen: accuracy {c['accuracy']:.4f}, llm share {c['llm_share']:.3f}, {c['cost_ms']:.3f} ms/item "
          f"(the last tier alone: {report['last_tier_accuracy']:.4f}); plot {report['plot']}")
    if (ev := report.get("evidence")) is not None and "val_only" in ev:
        alone = ev["val_only"]
        left_out = (f"{ev['dropped_on_path']} left out: on the path" if "dropped_on_path" in ev
                    else f"{ev.get('dropped_seen', 0)} left out: texts the tiers may have learnt")
        print(f"label-free evidence: {ev['n']} items ({left_out}); "
              f"large-model share {ev['with_label_free']['llm_share']:.3f} with it, "
              + (f"{alone['llm_share']:.3f} with val alone" if "llm_share" in alone
                 else f"val alone: {alone['error']}"))
    if not args.dry_run:
        print(f"wrote the thresholds into {args.config}")
    return 0


# --- flywheel ------------------------------------------------------------------------------


def cmd_flywheel(args: argparse.Namespace) -> int:
    from training.flywheel import FlywheelConfig, FlywheelError, run_flywheel
    from training.recipes import STUDENT
    from training.trainer import TrainConfig

    try:
        cfg = FlywheelConfig(budget=args.budget, strategy=args.strategy, measure=args.uncertainty, seed=args.seed,
                             max_train=args.max_train, max_loss=args.max_loss, confidence=args.confidence,
                             label_batch=args.label_batch, min_agreement=args.min_agreement or None,
                             max_pool=args.max_pool, audit_evidence=args.calibrate_on_audits,
                             from_start=args.from_start, carry_pool=args.carry_pool)
        lr = args.lr if args.lr is not None else STUDENT["lr"]
        train_cfg = TrainConfig(**{**STUDENT, "lr": lr, "epochs": args.epochs, "max_steps": args.max_steps,
                                   "batch_size": args.batch_size, "warmup_steps": args.warmup_steps,
                                   "precision": args.precision, "seed": args.seed})
        m = run_flywheel(args.config, args.log, args.data, args.out, cfg, train_cfg, promote=args.promote,
                         dry_run=args.dry_run, resume=args.resume, progress=not args.no_progress,
                         log=print if args.json != "-" else lambda *a, **k: print(*a, **k, file=sys.stderr))
    except FlywheelError as exc:
        raise DataError(str(exc)) from exc
    if m.get("dry_run"):
        _emit(m, args.json, f"dry run: would label {len(m['picks']['texts'])} texts")
        return 0
    g = m["gate"]
    verdict = ("promoted: " + f"{args.out}/current -> {m['version']}" if m["promoted"] else
               "gate passed; not promoted (no --promote): current unchanged" if g["passed"] else
               "gate refused: current unchanged")
    table = "\n".join([f"wrote {m['path']} ({verdict})", *g["reasons"]]
                      + ([f"serving: POST /admin/reload (with no body, a server started on {args.out}/current/"
                          "cascade.toml moves to it; rollback: point current back, then the same call)"]
                         if m["promoted"] else []))
    _emit(m, args.json, table)
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
    _emit(result.to_json(), args.json, format_plan(result))
    return 0


# --- models and training (torch: imported only here) ---------------------------------------


def cmd_models_import(args: argparse.Namespace) -> int:
    from training.importer import import_model

    out = import_model(args.source, args.out)
    print(f"wrote {out}")
    return 0


def cmd_train_large(args: argparse.Namespace) -> int:
    from training.large import train_large
    from training.trainer import TrainConfig

    cfg = TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, precision=args.precision,
                      eval_every=args.eval_every, ckpt_every=args.ckpt_every, keep_last=args.keep_last,
                      seed=args.seed, spike_factor=args.spike_factor, clip_norm=args.clip_norm,
                      weight_decay=args.weight_decay)
    run = train_large(args.data, args.out, init=args.init, size=args.size, cfg=cfg, resume=args.resume,
                      limit_train=args.limit_train, eval_limit=args.eval_limit, vocab_size=args.vocab_size,
                      inference_tokens=args.inference_tokens, progress=not args.no_progress,
                      save_dtype=args.save_dtype, checkpoint_dir=args.checkpoint_dir)
    if run.summary.get("world_size", 1) == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        s = run.summary
        print(f"wrote {run.out}: {s['steps']} steps, val accuracy {s['val_accuracy']}, "
              f"{s['tokens_per_s']:.0f} tokens/s, {s['wall_s']:.0f}s")
    return 0


def cmd_train_student(args: argparse.Namespace) -> int:
    from training.distill import train_student
    from training.recipes import PRETRAINED_STUDENT, STUDENT
    from training.student import PRETRAINED_STUDENTS
    from training.trainer import TrainConfig

    recipe = PRETRAINED_STUDENT if args.size in PRETRAINED_STUDENTS else STUDENT
    lr = args.lr if args.lr is not None else recipe["lr"]
    cfg = TrainConfig(lr=lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                      warmup_steps=args.warmup_steps, precision=args.precision, ckpt_every=args.ckpt_every,
                      seed=args.seed)
    teacher = None if args.teacher.lower() == "none" else args.teacher
    common = dict(size=args.size, from_teacher=args.from_teacher, unlabeled=args.unlabeled, augment=args.augment,
                  limit_train=args.limit_train, inference_tokens=args.inference_tokens,
                  teacher_fields=args.teacher_fields, teacher_fields_weight=args.teacher_fields_weight,
                  tag_weight=args.tag_weight, vocab_size=args.vocab_size, max_len=args.max_len)
    temperature, alpha, searched = args.temperature, args.alpha, None
    if args.kd_search:
        from training.kd_search import DEFAULT_GRID, parse_grid, search_kd

        if temperature is not None or alpha is not None:
            raise SystemExit("--kd-search chooses --temperature and --alpha on val: give either the search or them")
        if teacher is None:
            raise SystemExit("--kd-search tunes the distillation loss: it needs a --teacher")
        grid = parse_grid(args.kd_grid) if args.kd_grid else DEFAULT_GRID
        searched = search_kd(args.data, teacher, args.out, cfg, args.kd_search_epochs, grid,
                             progress=not args.no_progress, **common)
        temperature, alpha = searched["chosen"]["temperature"], searched["chosen"]["alpha"]
        print(f"--kd-search: T={temperature:g}, alpha={alpha:g} (val accuracy {searched['chosen']['val_accuracy']:.4f}"
              f" after {args.kd_search_epochs:g} epochs; {len(grid)} points, {searched['dir']})")
    run = train_student(args.data, teacher, args.out, temperature=2.0 if temperature is None else temperature,
                        alpha=0.5 if alpha is None else alpha, cfg=cfg, resume=args.resume,
                        progress=not args.no_progress, kd_search=searched, **common)
    s = run.summary
    c = s["calibration"]
    if s["task"] != "classify":
        label = f"val accuracy {s['val_accuracy']:.4f}, " if s["task"] == "joint" else ""
        aurocs = ", ".join(f"{m} {a:.3f}" if a is not None else f"{m} -" for m, a in s["confidence_auroc"].items())
        print(f"wrote {run.out}: tagging student {s['size']} ({s['non_embedding_params']:,} non-embedding params), "
              f"{label}val span F1 {s['val_span_f1']:.4f}, exact match {s['val_exact_match']:.4f}; confidence "
              f"AUROC {aurocs} -> {s['confidence_method']}; next: cascade export --model {run.out} --int8")
        return 0
    print(f"wrote {run.out}: student {s['size']} ({s['non_embedding_params']:,} non-embedding params), "
          f"val accuracy {s['val_accuracy']:.4f}, temperature {c['temperature']:.3f}, "
          f"ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}; next: cascade export --model {run.out} --int8")
    return 0


def cmd_train_crossfit(args: argparse.Namespace) -> int:
    from training.crossfit import crossfit

    try:
        res = crossfit(args.config, args.data, args.out, folds=args.folds, seed=args.seed, limit=args.limit,
                       toy_rules=args.toy_rules, progress=not args.no_progress,
                       recipe={k: v for k, v in (("lr", args.lr), ("epochs", args.epochs),
                                                 ("warmup_steps", args.warmup_steps)) if v is not None})
    except ValueError as exc:  # a cascade or dataset it cannot cross-fit: said, not a traceback
        raise DataError(str(exc)) from exc
    agree = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in res["agreement_with_llm"].items())
    print(f"wrote {res['path']}: {res['n']} train texts, {res['folds']} folds; out-of-fold agreement with the large "
          f"model where each tier answers: {agree}\nnext: cascade calibrate --config {args.config} --data {args.data} "
          f"--target-accuracy llm --max-loss 0.005 --confidence 0.9 --label-free {res['path']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json as _json

    from cascade.data import load_split
    from training.export import export_onnx, quantize_int8

    meta = _json.loads((Path(args.model) / "cascade.json").read_text())
    data = args.data or (str(Path(args.model) / meta["data"]) if meta.get("data") else None)  # relative to the dir
    if data is None:
        raise DataError(f"--data: {args.model}/cascade.json names no dataset; give the dataset dir whose "
                        "validation split checks parity, int8 agreement and the FP8 accuracy change")
    val = load_split(data, "val")
    texts = [ex.text for ex in val]
    from training.student import is_student_config

    is_student = is_student_config(_json.loads((Path(args.model) / "config.json").read_text()))
    report: dict = {}
    if args.int8 and not is_student:
        raise DataError(f"--int8: {args.model} is a large model; ONNX int8 is for students (use --fp8)")
    if is_student:
        report = export_onnx(args.model, texts[: args.parity_texts])
        tags = (f", tags {report['parity_tag_max_abs_diff']:.2e}, decoded fields identical"
                if "parity_tag_max_abs_diff" in report else "")
        print(f"wrote {report['onnx']}: parity max |p_onnx - p_torch| = {report['parity_max_abs_diff']:.2e}{tags} "
              f"on {report['parity_texts']} texts")
    if args.fp8:
        import random

        from training.export import export_fp8

        # a seeded sample, not the head: split files are often grouped by label
        sample = random.Random(0).sample(val, min(args.fp8_texts, len(val)))
        f = export_fp8(args.model, [ex.text for ex in sample], [ex.label for ex in sample])
        report["fp8"] = f
        print(f"fp8: {f['converted_layers']} feed-forward layers in e4m3 (first and last blocks kept); "
              f"val accuracy {f['accuracy_before']:.4f} -> {f['accuracy_fp8']:.4f} on {f['n']} texts")
    if args.int8:
        mode = "static" if args.static_int8 else args.int8_mode  # --static-int8: the older spelling
        train = Path(data) / "train.jsonl"  # static scales are calibrated on train texts, checked on val
        calib = [ex.text for ex in load_split(data, "train")] if train.exists() else None
        q = quantize_int8(args.model, texts, mode=mode, calibration=calib, min_agreement=args.min_agreement or None)
        report["int8"] = q
        kept = f"; {len(q['kept_fp32'])} sensitive MatMuls kept in fp32" if q["kept_fp32"] else ""
        what = "label+fields agreement" if "fields_agreement" in q else "top-1 agreement"
        fields = f", fields alone {q['fields_agreement']:.4f}" if "fields_agreement" in q else ""
        print(f"wrote {q['int8']} ({mode}): {what} with fp32 {q['top1_agreement']:.4f} on "
              f"{q['agreement_texts']} val texts (all-int8: {q['agreement_all_int8']:.4f}{kept}{fields})")
        if not q["target_met"]:
            print(f"warning: int8 agreement {q['top1_agreement']:.4f} is below --min-agreement {args.min_agreement}",
                  file=sys.stderr)
    (Path(args.model) / "export.json").write_text(_json.dumps(report, indent=1) + "\n")
    return 0


# --- the large model served ----------------------------------------------------------------


def _check_port_free(host: str, port: int) -> None:
    """Before any model loads: a busy port should cost a second, not a model load."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def _load_fault(what: str, exc: BaseException) -> ConfigError:
    """A load-time fault as one line naming what failed (no uvicorn traceback for a user's mistake)."""
    return ConfigError(f"{what}: {type(exc).__name__}: {exc}")


def _run_server(make_app, args: argparse.Namespace, what: str) -> int:
    """Open the port at once and serve; the models load behind it (`/readyz`, `/health`). A load
    that fails ends the server and this command with the one-line error (exit status 2)."""
    import uvicorn

    from serving.observability import configure_logging

    configure_logging(args.log_level, args.log_format)
    failed: list[str] = []

    def on_load_error(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app = make_app(on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=getattr(args, "drain_s", None)))
    print(f"serving {what} on http://{args.host}:{args.port} (ready when /readyz or /health says 200)",
          file=sys.stderr)
    server.run()
    if failed:
        raise ConfigError(failed[0])
    return 0


def cmd_llm_serve(args: argparse.Namespace) -> int:
    from cascade.config import ServingConfig
    from serving.app import create_llm_app
    from serving.engine.config import EngineConfig

    _check_port_free(args.host, args.port)
    model = Path(args.model)
    if not (model / "config.json").exists():
        raise ConfigError(f"--model {model}: no config.json there (a Hugging Face Llama-family model dir)")
    if not (model / "tokenizer.json").exists():
        raise ConfigError(f"--model {model}: no tokenizer.json there (the engine needs the fast tokenizer)")
    try:
        config = EngineConfig.default(dtype=args.dtype, block_size=args.block_size, memory_gb=args.kv_memory_gb,
                                      enable_prefix_caching=not args.no_prefix_caching,
                                      max_num_seqs=args.max_num_seqs,
                                      max_num_batched_tokens=args.max_num_batched_tokens, threads=args.threads)
    except (ValueError, KeyError) as exc:
        raise _load_fault(f"--model {model}", exc) from None
    name = args.name or model.name
    limits = ServingConfig(api_keys_env=args.api_keys_env, max_prompts=args.max_prompts)
    keys = ", API keys required" if os.environ.get(args.api_keys_env) else ""
    return _run_server(lambda on_error: create_llm_app(model, name, limits=limits, engine_config=config,
                                                       on_load_error=on_error),
                       args, f"{name} (OpenAI-compatible /v1{keys})")


def cmd_batch(args: argparse.Namespace) -> int:
    from serving.batch_job import run_batch

    if args.ray is not None:
        return _batch_on_ray(args)

    s = run_batch(args.input, args.config, args.out, resume=args.resume, batch_size=args.batch_size,
                  text_field=args.text_field, id_field=args.id_field, label_field=args.label_field,
                  progress=not args.no_progress)
    shares = "  ".join(f"{k} {v:.1%}" for k, v in s["shares"].items())
    print(f"wrote {s['rows']} rows to {s['out']} ({s['items_per_s']:.0f} items/s); answered by: {shares}")
    if s["malformed"]:
        print(f"{s['malformed']} malformed rows -> {s['errors_file']} (with their line numbers)")
    if s["accuracy"] is not None:
        print(f"accuracy on the {s['labelled']} labelled rows: {s['accuracy']:.4f}")
    if s["all_llm_cost_ms"]:
        print(f"compute: {s['cost_ms'] / 1000:.1f}s in the cascade vs ~{s['all_llm_cost_ms'] / 1000:.1f}s "
              "with every row at the large model")
    if s["degraded"]:
        print(f"{s['degraded']} answers degraded (the large model failed; an earlier tier's answer was used)")
    if s["traffic_log"]:
        t = s["traffic_log"]
        lost = sum(t["dropped"].values())
        print(f"traffic log: {t['written']} entries written" + (f", {lost} dropped ({t['dropped']})" if lost else ""))
    return 0


def _batch_on_ray(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401

        from serving.batch_ray import run_batch_ray
    except ImportError:
        raise ConfigError("--ray: Ray is not installed (pip install 'cascade[ray]')") from None
    s = run_batch_ray(args.input, args.config, args.out, address=None if args.ray == "local" else args.ray,
                      workers=args.workers, resume=args.resume, batch_size=args.batch_size,
                      shard_rows=args.shard_rows, text_field=args.text_field, id_field=args.id_field,
                      label_field=args.label_field, progress=not args.no_progress)
    shares = "  ".join(f"{k} {v:.1%}" for k, v in s["shares"].items())
    print(f"wrote {s['rows']} rows in {s['shards']} shards to {s['out']} ({s['routed_now']} routed now, "
          f"{s['rows_per_s']:.0f} rows/s); answered by: {shares}")
    if s["malformed"]:
        print(f"{s['malformed']} malformed or failed rows -> {s['errors_file']} (with their line numbers)")
    if s["accuracy"] is not None:
        print(f"accuracy on the {s['labelled']} labelled rows: {s['accuracy']:.4f}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.app import create_app

    _check_port_free(args.host, args.port)
    # The event loop shares the GIL with the tier threads; at Python's default 5 ms switch
    # interval, every hand-off to the loop could wait that long (docs/service.md, bench/load.py).
    sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    # The config's keys and types fail in create_app, with the file and key, before the port opens.
    return _run_server(lambda on_error: create_app(args.config, on_load_error=on_error), args,
                       f"{args.config} (/v1/classify)")


# --- quickstart ----------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace) -> int:
    from cascade.app.quickstart import run_quickstart

    run_quickstart(args.workdir, data=args.data, smoke=args.smoke, progress=not args.no_progress,
                   extract=args.extract)
    return 0


# --- parser --------------------------------------------------------------------------------


def _student_training_flags(p: argparse.ArgumentParser) -> None:
    """The student recipe's knobs, shared by `train student` and `flywheel`."""
    from training.recipes import PRETRAINED_STUDENT, STUDENT

    p.add_argument("--epochs", type=float, default=STUDENT["epochs"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=STUDENT["batch_size"])
    p.add_argument("--lr", type=float, help=f"default {STUDENT['lr']:g} ({PRETRAINED_STUDENT['lr']:g} for a "
                                            "pre-trained --size such as minilm-l6)")
    p.add_argument("--warmup-steps", type=int, default=STUDENT["warmup_steps"])
    p.add_argument("--precision", "--dtype", dest="precision", default=STUDENT["precision"],
                   choices=["auto", "bf16", "fp16", "fp32"], help="training's compute precision")


def _log_flags(p: argparse.ArgumentParser) -> None:
    from serving.observability import LOG_FORMATS, LOG_LEVELS

    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the access log is at info")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS, help="json: one JSON object per line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="Answer each request with the cheapest tier that is confident enough.",
    )
    from cascade import __version__

    parser.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quickstart(sub)
    _add_plan(sub)
    _add_models(sub)
    _add_batch(sub)
    _add_serve(sub)
    _add_llm(sub)
    _add_train(sub)
    _add_export(sub)
    _add_data(sub)
    _add_rules(sub)
    _add_calibrate(sub)
    _add_flywheel(sub)
    _add_eval(sub)
    _show_defaults(parser)
    return parser


def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    """Add `quickstart`."""
    p = sub.add_parser("quickstart", help="the main job, end to end, on the built-in demo task")
    p.add_argument("--workdir", default="runs/quickstart", help="where data, models, config and reports go")
    p.add_argument("--data", help="a prepared dataset dir instead of the generated demo task")
    p.add_argument("--smoke", action="store_true", help="toy scale (tiny models, few steps): checks the wiring fast")
    p.add_argument("--extract", action="store_true",
                   help="the demo task with fields (order ids, e-mail addresses, dates): every tier extracts them")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_quickstart)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    """Add `plan`."""
    p = sub.add_parser("plan", help="Chinchilla and inference-aware model sizing for a budget")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=parse_quantity, help="training tokens available (e.g. 2M, 1.4T)")
    budget.add_argument("--compute", type=parse_quantity, help="training compute in FLOPs (e.g. 5.9e23)")
    p.add_argument("--inference-tokens", type=parse_quantity, default=0.0,
                   help="tokens the model will process over its serving life")
    _json_flag(p, "the plan")
    p.set_defaults(func=cmd_plan)


def _add_models(sub: argparse._SubParsersAction) -> None:
    """Add `models import`."""
    models = sub.add_parser("models", help="pre-trained models").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("import", help="turn a known model (smollm2-135m, minilm-l6), a .gguf or an HF dir "
                                         "into a model dir")
    p.add_argument("source", help="smollm2-135m | minilm-l6 (the encoder of `--size minilm-l6` students) | "
                                  "path to .gguf | Hugging Face Llama-family dir")
    p.add_argument("--out", help="model dir to write; a known name defaults to $CASCADE_HOME/models/NAME "
                                 "(where --init NAME and --size NAME look)")
    p.set_defaults(func=cmd_models_import)


def _add_batch(sub: argparse._SubParsersAction) -> None:
    """Add `batch`."""
    p = sub.add_parser("batch", help="classify a JSONL/CSV (or, on Ray, Parquet) file; resumable, in input order")
    p.add_argument("input", help="JSONL or CSV with a text column (optional id and label); Parquet with --ray")
    p.add_argument("--config", required=True, help="cascade.toml")
    p.add_argument("--out", required=True, help="OUT.jsonl (errors: OUT.errors.jsonl); with --ray a directory of "
                                                "part-NNNNN.jsonl shards")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="route on Ray Data: a local cluster, or the one at ADDRESS (host:port, or 'auto')")
    p.add_argument("--workers", type=int, default=2, help="--ray: actors holding the cascade")
    p.add_argument("--shard-rows", type=int, default=1000, help="--ray: input rows per output shard")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--label-field", default="label")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_batch)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """Add `serve`."""
    p = sub.add_parser("serve", help="the cascade over HTTP: /v1/classify, /healthz, /readyz, /metrics")
    p.add_argument("--config", required=True, help="cascade.toml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--drain-s", type=float, default=30.0, help="on shutdown, how long in-flight requests may finish")
    p.add_argument("--switch-interval-ms", type=float, default=1.0,
                   help="Python's GIL switch interval in this process (its default: 5)")
    _log_flags(p)
    p.set_defaults(func=cmd_serve)


def _add_llm(sub: argparse._SubParsersAction) -> None:
    """Add `llm serve`."""
    llm = sub.add_parser("llm", help="the large model on the built-in engine").add_subparsers(
        dest="llm_command", required=True, metavar="ACTION")
    p = llm.add_parser("serve", help="OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models")
    p.add_argument("--model", required=True, help="Hugging Face Llama-family model dir (with tokenizer.json)")
    p.add_argument("--name", help="model name clients send (default: the dir name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--dtype", "--precision", dest="dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="the weights' dtype in the engine (auto: bf16 where the CPU is fast at it)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--kv-memory-gb", type=float, default=2.0, help="KV cache budget")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--api-keys-env", default="CASCADE_API_KEYS",
                   help="env var with comma-separated API keys; when set, every route but /healthz needs one")
    p.add_argument("--max-prompts", type=int, default=64, help="most prompts in one /v1/completions request")
    p.add_argument("--drain-s", type=float, default=30.0, help="on shutdown, how long in-flight requests may finish")
    _log_flags(p)
    p.set_defaults(func=cmd_llm_serve)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """Add `train large`, `train student` and `train crossfit`."""
    train = sub.add_parser("train", help="train models").add_subparsers(dest="train_command", required=True,
                                                                         metavar="WHAT")
    _add_train_large(train)
    _add_train_student(train)
    _add_train_crossfit(train)


def _add_train_crossfit(train: argparse._SubParsersAction) -> None:
    """Add `train crossfit`."""
    p = train.add_parser("crossfit", help="out-of-fold cheap tiers on train: label-free evidence for calibrate")
    p.add_argument("--config", required=True, help="the cascade.toml whose cheap tiers (rules, student) are re-fit")
    p.add_argument("--data", required=True, help="the dataset dir its student was distilled on")
    p.add_argument("--out", required=True, help="dir for the fold models and evidence.json")
    p.add_argument("--folds", type=int, default=3, help="K: each fold's tiers learn from the other K - 1")
    p.add_argument("--limit", type=int, help="score at most N train texts (a seeded sample); all still train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy-rules", action="store_true", help="mine rules at toy-scale supports (tiny datasets)")
    p.add_argument("--lr", type=float, help="the students' recipe, in place of the deployed student's recorded one")
    p.add_argument("--epochs", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_train_crossfit)


def _add_train_large(train: argparse._SubParsersAction) -> None:
    """Add `train large`."""
    from training.recipes import LARGE  # torch-free: the defaults `--help` shows

    p = train.add_parser("large", help="fine-tune (--init) or pretrain the large model; torchrun shards it")
    p.add_argument("--data", required=True, help="dataset dir")
    p.add_argument("--out", required=True, help="model dir to write (checkpoints beside it, in OUT.checkpoints)")
    p.add_argument("--checkpoint-dir", help="where checkpoints go and --resume looks (default OUT.checkpoints)")
    p.add_argument("--save-dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the saved weights")
    p.add_argument("--init", help="smollm2-135m or an HF model dir to fine-tune; omit to pretrain")
    p.add_argument("--size", default="auto", help="named size when pretraining, or auto (planner)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--epochs", type=float, default=LARGE["epochs"])
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=LARGE["batch_size"],
                   help="sequences per optimizer step, all ranks")
    p.add_argument("--grad-accum", type=int, default=LARGE["grad_accum"])
    p.add_argument("--lr", type=float, default=LARGE["lr"])
    p.add_argument("--warmup-steps", type=int, default=LARGE["warmup_steps"])
    p.add_argument("--weight-decay", type=float, default=LARGE["weight_decay"])
    p.add_argument("--clip-norm", type=float, default=LARGE["clip_norm"])
    p.add_argument("--precision", "--dtype", dest="precision", default=LARGE["precision"],
                   choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU and on CPUs with AMX/AVX512-BF16, else fp32")
    p.add_argument("--eval-every", type=int, default=LARGE["eval_every"],
                   help="steps between val evaluations (0: at the end)")
    p.add_argument("--ckpt-every", type=int, default=LARGE["ckpt_every"], help="steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=LARGE["keep_last"], help="checkpoints kept")
    p.add_argument("--spike-factor", type=float, default=LARGE["spike_factor"],
                   help="skip steps whose loss exceeds this x mean")
    p.add_argument("--seed", type=int, default=LARGE["seed"])
    p.add_argument("--limit-train", type=int,
                   help="a seeded sample of N training rows only (the rest stay unseen: crossfit evidence)")
    p.add_argument("--limit-eval", "--eval-limit", dest="eval_limit", type=int, default=300,
                   help="val rows sampled for periodic accuracy")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when pretraining")
    p.add_argument("--inference-tokens", type=parse_quantity, default=0.0, help="for --size auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_large)


def _add_train_student(train: argparse._SubParsersAction) -> None:
    """Add `train student`."""
    from training.recipes import STUDENT  # torch-free: the defaults `--help` shows

    p = train.add_parser("student", help="distil the large model into a compact student")
    p.add_argument("--data", required=True, help="dataset dir")
    p.add_argument("--teacher", required=True,
                   help="large-model dir from `cascade train large`, or `none`: from gold alone (own BPE tokenizer)")
    p.add_argument("--out", required=True, help="student dir to write")
    p.add_argument("--teacher-fields", help="extraction tasks: JSONL rows {text, fields}, the large model's "
                                            "extractions; tag targets for texts without gold (docs/extraction.md)")
    p.add_argument("--teacher-fields-weight", type=float, default=1.0,
                   help="weight of a --teacher-fields row's tag loss (gold rows: 1)")
    p.add_argument("--tag-weight", type=float, default=1.0, help="weight of the tag term against the label term")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary with --teacher none")
    p.add_argument("--max-len", type=int, default=64, help="tokens the student reads per text")
    p.add_argument("--size", default="small", help="debug | small | distil-smollm2 | minilm-l6 (pre-trained "
                                                   "encoder, own tokenizer; docs/students.md) | auto (planner)")
    p.add_argument("--from-teacher", action="store_true", help="initialise from the teacher's embeddings and layers")
    p.add_argument("--temperature", type=float, help="distillation temperature T (default 2)")
    p.add_argument("--alpha", type=float, help="weight of the teacher term, 1 - alpha on labels (default 0.5)")
    p.add_argument("--kd-search", action="store_true",
                   help="choose T and alpha on val: one short student per --kd-grid point (docs/students.md)")
    p.add_argument("--kd-grid", help="T:alpha,... points for --kd-search (default 2:0.5,1:0.5,4:0.5,2:0.9,1:0.9,4:0.9)")
    p.add_argument("--kd-search-epochs", type=float, default=1.0, help="epochs of each --kd-search student")
    p.add_argument("--unlabeled", help="extra texts without labels (JSONL with text, or one per line)")
    p.add_argument("--augment", type=int, default=0,
                   help="perturbed copies per train text, labelled by the teacher alone (training/augment.py)")
    _student_training_flags(p)
    p.add_argument("--ckpt-every", type=int, default=STUDENT["ckpt_every"])
    p.add_argument("--seed", type=int, default=STUDENT["seed"])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--limit-train", type=int, help="first N training rows only")
    p.add_argument("--inference-tokens", type=parse_quantity, default=1e9, help="traffic for --size auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_student)


def _add_export(sub: argparse._SubParsersAction) -> None:
    """Add `export`."""
    p = sub.add_parser("export", help="student to ONNX (parity-checked) and int8; FP8 for students and large models")
    p.add_argument("--model", required=True, help="student dir")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx")
    p.add_argument("--data", help="dataset dir for parity/agreement texts (default: the one in cascade.json)")
    p.add_argument("--parity-texts", type=int, default=256)
    p.add_argument("--int8-mode", choices=("static", "dynamic"), default="static",
                   help="static: activation scales fixed at export (calibrated on train texts), so a text's "
                        "answer does not depend on its batch; dynamic: scales per batch at run time")
    p.add_argument("--static-int8", action="store_true", help=argparse.SUPPRESS)  # = --int8-mode static
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="int8 top-1 agreement target on val; below it the most sensitive MatMuls stay fp32 (0: off)")
    p.add_argument("--fp8", action="store_true", help="FP8 feed-forward weights (Llama 3 recipe); large models too")
    p.add_argument("--fp8-texts", type=int, default=500, help="val texts for the FP8 accuracy change")
    p.set_defaults(func=cmd_export)


def _add_data(sub: argparse._SubParsersAction) -> None:
    """Add `data prepare`."""
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("prepare", help="turn CLINC150, Banking77, SNIPS or any CSV/JSONL into a dataset dir")
    p.add_argument("--dataset", required=True, choices=["clinc150", "banking77", "snips", "csv", "jsonl"])
    p.add_argument("--path", required=True, help="source file or directory")
    p.add_argument("--out", required=True, help="dataset dir to write")
    p.add_argument("--skip-bad", action="store_true", help="skip rows with empty text or no label (reported)")
    p.add_argument("--text-field", default="text", help="text column (csv/jsonl)")
    p.add_argument("--label-field", default="label", help="label column (csv/jsonl)")
    p.add_argument("--task", choices=["classify", "extract", "joint"], default=None,
                   help="task kind (default: joint/extract when rows carry a `fields` column, else classify)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train carved for val when missing")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of train carved for test when missing")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_prepare)


def _add_rules(sub: argparse._SubParsersAction) -> None:
    """Add `rules check` and `rules mine`."""
    rules = sub.add_parser("rules", help="rule packs").add_subparsers(
        dest="rules_command", required=True, metavar="ACTION")
    p = rules.add_parser("check", help="per-rule support and precision, coverage, conflicts")
    p.add_argument("pack", help="rule pack .toml")
    p.add_argument("--data", required=True, help="dataset dir")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    _json_flag(p, "the full report")
    p.add_argument("--timeout-ms", type=float, default=20.0, help="matching budget per text")
    p.set_defaults(func=cmd_rules_check)
    p = rules.add_parser("mine", help="induce high-precision phrase (extraction: template) rules from a dataset dir")
    p.add_argument("--data", required=True, help="dataset dir (mines train, validates on val)")
    p.add_argument("--out", required=True, help="rule pack .toml to write")
    p.add_argument("--min-precision", type=float, default=0.99)
    p.add_argument("--min-support", type=int, default=None,
                   help="least train matches per rule (default 8; extraction templates: 3 train texts)")
    p.add_argument("--min-val-support", type=int, default=None,
                   help="least val matches per rule (default 3; extraction templates: 1)")
    p.add_argument("--min-words", type=int, default=2, help="shortest phrase, in words")
    p.add_argument("--max-rules-per-label", type=int, default=5)
    p.add_argument("--oos-share", type=float, default=0.2,
                   help="expected share of out-of-scope traffic; out-of-scope matches are weighted up to it")
    p.add_argument("--max-field-values", type=int, default=100,
                   help="extraction: a field with at most this many distinct train values is matched from their list")
    p.add_argument("--name", help="pack name (default: the file stem)")
    p.set_defaults(func=cmd_rules_mine)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    """Add `calibrate`."""
    p = sub.add_parser("calibrate", help="choose every tier's threshold jointly on validation data")
    p.add_argument("--config", required=True, help="cascade.toml (its thresholds are rewritten)")
    p.add_argument("--data", required=True, help="dataset dir")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-accuracy", help="reach this accuracy at the lowest cost; 'llm' = the last tier's own "
                                                "(minus --max-loss)")
    goal.add_argument("--max-llm-share", type=float, help="best accuracy with at most this share at the large model")
    p.add_argument("--max-loss", type=float, default=0.0,
                   help="with --target-accuracy llm: tolerate this much accuracy below the large model's, "
                        "e.g. 0.005 (0.5 pt)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--candidates", type=int, default=24, help="threshold quantiles tried per tier")
    p.add_argument("--confidence", type=float,
                   help="with --target-accuracy: certify the target with this confidence, the search included "
                        "(Learn then Test; docs/calibration.md), e.g. 0.9")
    p.add_argument("--path-split", default="train", choices=["train", "val", "test", "learn"],
                   help="with --confidence: the labelled items the tested path is learnt on (the cheap tiers only); "
                        "'learn': a --learn-share of --split instead (then only the rest tests it)")
    p.add_argument("--learn-share", type=float, default=0.3, help="with --path-split learn")
    p.add_argument("--seed", type=int, default=0, help="the learn split's and the path sample's seed")
    p.add_argument("--no-oos-threshold", action="store_true",
                   help="no separate threshold for out-of-scope answers (labels.json's oos_label)")
    p.add_argument("--oos-share", type=float,
                   help="weight the split so out-of-scope items are this share of traffic (e.g. 0.2; default: "
                        "as they come)")
    p.add_argument("--label-free", metavar="EVIDENCE.json|LOG_DIR",
                   help="with --target-accuracy llm and --confidence: also certify on items with the large model's "
                        "answer but no gold: a file of `cascade train crossfit`, or a traffic log's audited sample "
                        "(docs/calibration.md)")
    p.add_argument("--label-free-share", type=float, default=0.2,
                   help="with --label-free: the share of 1 - confidence its test gets, the rest going to val's "
                        "(weighted Bonferroni, fixed before either is seen; default 0.2)")
    p.add_argument("--limit", type=int, help="at most N items (a seeded sample: --seed)")
    p.add_argument("--dry-run", action="store_true", help="report, but leave the config as it is")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=cmd_calibrate)


def _add_flywheel(sub: argparse._SubParsersAction) -> None:
    """Add `flywheel`."""
    p = sub.add_parser("flywheel", help="learn from the traffic log: label, distil again, recalibrate, gate a new "
                                        "version (docs/flywheel.md)")
    p.add_argument("--config", required=True, help="the current version's cascade.toml")
    p.add_argument("--log", required=True, help="the traffic log's dir (cascade.toml's traffic_log.dir)")
    p.add_argument("--data", required=True, help="dataset dir (train is kept in the distillation set; val gates)")
    p.add_argument("--out", required=True, help="versions dir: vNNN/ are written there, `current` points at one")
    p.add_argument("--budget", type=int, default=0, help="cheap-tier texts to have labelled by the large model")
    p.add_argument("--strategy", default="uncertainty", choices=["random", "uncertainty", "diversity", "importance"],
                   help="how the budget picks (training/selection.py)")
    p.add_argument("--uncertainty", default="margin", choices=["margin", "entropy"], help="uncertainty's measure")
    p.add_argument("--max-pool", type=int, default=10_000,
                   help="cheap-tier texts scored at most (a seeded sample of a larger pool)")
    p.add_argument("--carry-pool", type=int, default=20_000,
                   help="unpicked pool texts the new version hands to the next round (the newest; 0: none)")
    p.add_argument("--max-train", type=int, help="prune the distillation set to this many rows (default: all)")
    p.add_argument("--max-loss", type=float, default=0.005, help="the gate's and calibration's tolerance below the "
                                                                  "large model's val accuracy")
    p.add_argument("--confidence", type=float, default=0.9, help="calibration certifies the tolerance with this")
    p.add_argument("--calibrate-on-audits", action="store_true",
                   help="hold the log's audited sample out of training; recalibrate on val plus it (label-free)")
    p.add_argument("--from-start", action="store_true",
                   help="read the whole log, not only what came after the parent round's cursor")
    p.add_argument("--promote", action="store_true", help="point OUT/current at the new version if the gate passes")
    p.add_argument("--dry-run", action="store_true", help="read and pick only: no large-model call, nothing written")
    p.add_argument("--resume", action="store_true", help="continue an interrupted round (OUT/.vNNN.partial)")
    p.add_argument("--label-batch", type=int, default=64, help="texts per call to the large-model tier")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="int8 top-1 agreement target on val, as `cascade export` (0: off)")
    _student_training_flags(p)
    p.add_argument("--seed", type=int, default=0, help="random picks, diversity's first pick, training")
    _json_flag(p, "the manifest")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_flywheel)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """Add `eval`."""
    p = sub.add_parser("eval", help="evaluate a cascade on a labelled split")
    p.add_argument("--config", required=True, help="cascade.toml")
    p.add_argument("--data", required=True, help="dataset dir")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the report to FILE, and beside it (eval.json -> eval.md, eval.items.jsonl, "
                        "eval.confusion.png, eval.reliability.png); alone or '-': print the JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--baseline", action="store_true", help="also evaluate the last tier alone")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="at most N items (a seeded sample: --seed)")
    p.add_argument("--seed", type=int, default=0, help="the --limit sample's seed")
    p.set_defaults(func=cmd_eval)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's default in its --help line, on every subcommand (none for flags and
    options without one)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _show_defaults(child)
            continue
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS \
                or action.nargs == 0:
            continue
        if "%(default)" not in (action.help or ""):
            action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"


def main(argv: list[str] | None = None) -> int:
    from cascade.app.quiet import quiet_third_party

    quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
