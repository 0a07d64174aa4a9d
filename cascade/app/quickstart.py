"""`cascade quickstart`: the main job, end to end, on the built-in demo task (or `--data DIR`).

    generate the demo dataset -> mine rules -> fine-tune the large model from SmolLM2-135M ->
    distil and export an int8 student -> write cascade.toml (rules, student, llm) ->
    calibrate the thresholds on val -> evaluate on test against the large model alone

`--smoke` runs the same steps at toy scale (a tiny large model pretrained from scratch, a few
steps each) so CI can check the wiring in about a minute. Training needs torch (`.[train]`);
everything is imported step by step so the progress shows from the first second.
"""

from __future__ import annotations

import time
from pathlib import Path

# The three-tier layout of a run dir (rules.toml, student/, large/); bench/e2e.py writes it too.
CONFIG_TEMPLATE = """\
# Written by `{writer}`. Paths are relative to this file; `cascade calibrate`
# rewrote the thresholds.
[task]
name = "{task}"
kind = "{kind}"

[[tiers]]
name = "rules"
kind = "rules"
path = "rules.toml"
threshold = 0.0
options = {{ timeout_ms = 20 }}

[[tiers]]
name = "student"
kind = "student"
path = "student"
threshold = 0.0

[[tiers]]
name = "llm"
kind = "llm"
path = "large"
options = {{ backend = "builtin", memory_gb = 0.5 }}
"""


def fields_by_tier(cascade, texts: list[str]) -> str:
    """Each tier's own answer on the first of `texts` it extracts a field from, whether or not
    its confidence clears its threshold (the cascade would then have asked the next tier)."""
    lines = ["      a field extracted by each tier (its own answer, before routing):"]
    for tier, threshold in zip(cascade.tiers, cascade.thresholds):
        preds = tier.predict_batch(texts)
        hit = next(((t, p) for t, p in zip(texts, preds) if p is not None and p.fields), None)
        if hit is None:
            lines.append(f"      {tier.name:>8}: no field in these {len(texts)} texts")
            continue
        text, p = hit
        kept = "answers" if p.confidence >= threshold else "would escalate"
        lines.append(f"      {tier.name:>8}: {text!r} -> {p.fields} (confidence {p.confidence:.3f}, {kept})")
    return "\n".join(lines)


class Steps:
    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {what}   ({time.perf_counter() - self.t0:.0f}s so far)", flush=True)


def run_quickstart(workdir: str | Path, data: str | Path | None = None, smoke: bool = False,
                   progress: bool = True, extract: bool = False) -> dict:
    """The main job end to end on the demo task (or `data`). `extract`: the demo task with
    fields (order ids, e-mail addresses, dates), a joint task every tier extracts them in."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _print_cpu(smoke)
    step = Steps(8)
    data_dir, task = _task_data(step, workdir, data, smoke, extract)
    _mine_rules(step, workdir, data_dir, task, smoke)
    _train_large(step, workdir, data_dir, smoke, progress)
    _train_student(step, workdir, data_dir, smoke, progress)
    _export_student(step, workdir, data_dir)
    config_path, cal = _calibrate(step, workdir, data_dir, task, progress)
    report, files, report_path = _evaluate(step, config_path, data_dir, progress)
    step("done")
    print(f"report: {files['markdown']}  (JSON: {report_path}; every item: {files['items']})\n"
          f"plot:   {cal['plot']}\nconfig: {config_path}\n"
          f"serve:  cascade serve --config {config_path}\n"
          f"batch:  cascade batch INPUT.jsonl --config {config_path} --out OUT.jsonl\n"
          f"again:  cascade eval --config {config_path} --data {data_dir} --baseline --json {report_path}")
    return report


def _print_cpu(smoke: bool) -> None:
    from cascade.cpu import cpu_report

    cpu = cpu_report()
    print(f"CPU: {cpu['class']} ({' '.join(cpu['flags']) or 'no vector flags read'}), {cpu['cores']} cores: "
          + ("bf16 training; the full run takes 4-13 min on 2 such cores, by their bf16 speed (README)"
             if cpu["class"] in ("AMX", "AVX512-BF16")
             else "fp32 training (bf16 would be slower here); the full run was reported at 15 min on 2 cores")
          + ("" if not smoke else " (--smoke: about a minute)"))


def _task_data(step: Steps, workdir: Path, data: str | Path | None, smoke: bool, extract: bool) -> tuple[Path, str]:
    """Step 1: the demo task generated into WORKDIR/data, or the user's dataset dir."""
    from cascade.data import load_labels, load_split

    if data is None:
        from cascade.app.demo import make_demo

        data_dir = workdir / "data"
        step(f"generate the demo task (customer-support intents{', with fields' if extract else ''}, seeded) "
             f"-> {data_dir}")
        make_demo(data_dir, per_label=(12, 5, 5) if smoke else (120, 25, 40), extract=extract)
        task = "support-demo"
    else:
        data_dir = Path(data)
        step(f"use the dataset dir {data_dir}")
        task = data_dir.name
    labels = load_labels(data_dir)
    print(f"      {len(load_split(data_dir, 'train'))} train / {len(load_split(data_dir, 'val'))} val / "
          f"{len(load_split(data_dir, 'test'))} test, {len(labels.labels)} labels")
    return data_dir, task


def _mine_rules(step: Steps, workdir: Path, data_dir: Path, task: str, smoke: bool) -> None:
    from cascade.data import load_labels, load_split
    from cascade.rules.check import check_pack
    from cascade.rules.mine import mine_for_task, write_pack
    from cascade.rules.pack import load_pack

    step("mine a rule pack from train, kept only where precise on val")
    labels = load_labels(data_dir)
    val = load_split(data_dir, "val")
    pack = mine_for_task(load_split(data_dir, "train"), val, task, labels.task, labels.oos_label,
                         toy=smoke)  # templates for extraction
    write_pack(pack, workdir / "rules.toml")
    check = check_pack(load_pack(workdir / "rules.toml"), val, task=labels.task, field_names=labels.fields)
    prec = "-" if check["precision"] is None else f"{check['precision']:.3f}"
    print(f"      {len(pack['rule'])} rules; on val: coverage {check['coverage']:.3f}, precision {prec}")


def _train_large(step: Steps, workdir: Path, data_dir: Path, smoke: bool, progress: bool) -> None:
    from training.large import train_large
    from training.recipes import LARGE, SMOKE_LARGE
    from training.trainer import TrainConfig

    step("fine-tune the large model" + (" (smoke: a tiny one from scratch)" if smoke else " from SmolLM2-135M"))
    if smoke:
        large = train_large(data_dir, workdir / "large", size="debug", vocab_size=512,
                            cfg=TrainConfig(**SMOKE_LARGE), progress=progress)
    else:
        large = train_large(data_dir, workdir / "large", init="smollm2-135m",
                            cfg=TrainConfig(**{**LARGE, "warmup_steps": 10}),  # 75 steps here: a short warmup
                            progress=progress)
    print(f"      val accuracy {large.summary['val_accuracy']}, {large.summary['wall_s']:.0f}s")


def _train_student(step: Steps, workdir: Path, data_dir: Path, smoke: bool, progress: bool) -> None:
    from training.distill import train_student
    from training.recipes import SMOKE_STUDENT, STUDENT
    from training.trainer import TrainConfig

    step("distil a student from it (teacher labels cached), calibrate its temperature")
    student = train_student(data_dir, workdir / "large", workdir / "student",
                            size="debug" if smoke else "distil-smollm2", from_teacher=not smoke,
                            # the demo's 2,400 texts: more epochs at half the lr than the default
                            cfg=TrainConfig(**SMOKE_STUDENT) if smoke else
                            TrainConfig(**{**STUDENT, "lr": 5e-4, "epochs": 6, "warmup_steps": 20}),
                            progress=progress)
    print(f"      student val accuracy {student.summary['val_accuracy']:.4f}, "
          f"{student.summary['non_embedding_params']:,} non-embedding params")


def _export_student(step: Steps, workdir: Path, data_dir: Path) -> None:
    from cascade.data import load_split
    from training.export import export_onnx, quantize_int8

    step("export the student to ONNX (parity-checked) and int8 (agreement-checked)")
    texts = [ex.text for ex in load_split(data_dir, "val")]
    exp = export_onnx(workdir / "student", texts[:128])
    # static scales calibrated on train texts, agreement checked on val (as `cascade export --int8`)
    q = quantize_int8(workdir / "student", texts, min_agreement=0.99, sensitivity_texts=256,
                      calibration=[ex.text for ex in load_split(data_dir, "train")])
    print(f"      parity {exp['parity_max_abs_diff']:.1e}; int8 agreement {q['top1_agreement']:.4f}"
          + (f" ({len(q['kept_fp32'])} MatMuls kept fp32)" if q["kept_fp32"] else ""))


def _calibrate(step: Steps, workdir: Path, data_dir: Path, task: str, progress: bool) -> tuple[Path, dict]:
    """Write cascade.toml and calibrate it; returns (its path, the calibration record)."""
    from cascade.calibrate import CalibrationError, run_calibration
    from cascade.data import load_labels
    from cascade.progress import per_name

    step("write cascade.toml and calibrate the thresholds on val (target: within 0.5 pt of the large model's "
         "accuracy, with 90% confidence after the search; docs/calibration.md)")
    config_path = workdir / "cascade.toml"
    config_path.write_text(CONFIG_TEMPLATE.format(task=task, kind=load_labels(data_dir).task,
                                                  writer="cascade quickstart"), encoding="utf-8")
    try:
        cal = run_calibration(config_path, data_dir, "llm", max_loss=0.005, confidence=0.9,
                              progress=per_name("measuring", enabled=progress))
    except CalibrationError as exc:  # tiny smoke models may not reach it: take the best within the llm share
        print(f"      {exc}; calibrating for the best accuracy instead")
        cal = run_calibration(config_path, data_dir, max_llm_share=1.0,
                              progress=per_name("measuring", enabled=progress))
    c = cal["chosen"]
    print(cal["table"])
    print(f"      chosen: val accuracy {c['accuracy']:.4f} with {c['llm_share']:.1%} at the large model "
          f"(alone: {cal['last_tier_accuracy']:.4f})")
    return config_path, cal


def _evaluate(step: Steps, config_path: Path, data_dir: Path, progress: bool) -> tuple[dict, dict, Path]:
    """Step 7: the cascade against the large model alone on test; (report, report files, JSON path)."""
    from cascade.data import load_labels, load_split
    from cascade.evaluate import format_report, run_eval, write_reports

    step("evaluate on test: the cascade against the large model alone")
    report, items = run_eval(config_path, data_dir, "test", baseline=True, progress=progress)
    report_path = config_path.parent / "eval.json"
    files = write_reports(report, items, report_path)
    print(format_report(report))
    if load_labels(data_dir).task != "classify":
        from cascade.config import build_cascade, load_config

        shown = build_cascade(load_config(config_path), config_path.parent)
        try:
            print(fields_by_tier(shown, [ex.text for ex in load_split(data_dir, "test") if ex.fields][:64]))
        finally:
            shown.close()
    return report, files, report_path
