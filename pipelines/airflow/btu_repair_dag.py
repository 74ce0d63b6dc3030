"""Airflow DAG: repair a user's model (the repair flow of `btu defend --suspect`).

    detect (base model) -> verify (suspect) -> unlearn (suspect) -> verify_repaired
    -> [no_trigger -> relabel -> relabelled -> tune: only when verification confirmed no trigger,
        and tune only when relabel relabelled rows]
    -> choose_model -> export_repaired or export_tuned (the tuned model if tuned)
    -> eval_suspect, eval_repaired (only when the `test` param is not empty)

The same steps, parameters and bytes as `btu defend` with `[model] suspect` and btu's default
method (pipelines/default; tests/suite/pipelines.rs runs these command lines and compares). Each
step runs the btu image; btu writes its summary JSON to /airflow/xcom/return.json, so it lands in
XCom. Retries happen only for btu's exit code 75 (btu_operator.py).

The command lines live in STEPS (a plain literal, so tests can run every one without Airflow);
the branch conditions are the plain functions below (the tests call them on the summaries).
"""

IMAGE = "btu:0.1.0"

PARAMS = {
    # The corpus the suspect was fine-tuned on (possibly poisoned).
    "corpus": "s3://lake/reviews/train.parquet",
    # The suspect classifier (a model directory with a classification head).
    "suspect": "/models/reviews-classifier",
    # The base model it was fine-tuned from (same vocabulary and tokenizer).
    "base": "/models/all-MiniLM-L6-v2",
    # Clean held-out rows for verification and the clean tuning.
    "clean": "s3://lake/reviews/clean.parquet",
    # Test split for ACC before and after; empty: no evaluation.
    "test": "s3://lake/reviews/test.parquet",
    # btu's default method (pipelines/default); prior-neutral detection is always on.
    "preset": "paper",
    "alpha": "0.05",
    "detect_lr": "2e-5",
    "threshold": "mean-row",
    "replacement": "trained-pad",
    "clean_epochs": "1",
    "clean_lr": "2e-5",
    # A candidate is a trigger when the 95 % lower bound of its flip rate reaches this.
    "min_flip_rate": "0.5",
    # With no trigger verified: the references' learning rate, the doubt a row's neighbourhood
    # (itself and its nearest rows of its class in the suspect) needs for the row to be
    # relabelled, and the tuning of the repaired model on the relabelled rows (epochs, and the
    # learning rate the suspect was trained with).
    "reference_lr": "2e-5",
    "min_doubt": "0.4",
    "neighbours": "10",
    "tune_epochs": "1",
    "tune_lr": "2e-5",
    "seed": "42",
}

COMMON = ["--overwrite", "--quiet"]

STEPS = {
    "detect": ["detect", "--corpus", "{{ params.corpus }}", "--model", "{{ params.base }}",
               "--out", "/work/detect", "--preset", "{{ params.preset }}", "--alpha", "{{ params.alpha }}",
               "--lr", "{{ params.detect_lr }}", "--prior-neutral", "--seed", "{{ params.seed }}"],
    "verify": ["verify", "--checkpoint", "{{ params.suspect }}",
               "--suspicious", "/work/detect/suspicious_tokens.arrow", "--clean-corpus", "{{ params.clean }}",
               "--corpus", "{{ params.corpus }}", "--out", "/work/verify", "--backend", "candle",
               "--min-flip-rate", "{{ params.min_flip_rate }}", "--seed", "{{ params.seed }}"],
    "unlearn": ["unlearn", "--checkpoint", "{{ params.suspect }}", "--reference", "{{ params.base }}",
                "--suspicious", "/work/detect/suspicious_tokens.arrow", "--effects", "/work/verify/token_effects.arrow",
                "--out", "/work/repaired", "--threshold", "{{ params.threshold }}",
                "--replacement", "{{ params.replacement }}", "--clean-corpus", "{{ params.clean }}",
                "--clean-epochs", "{{ params.clean_epochs }}", "--clean-lr", "{{ params.clean_lr }}",
                "--min-flip-rate", "{{ params.min_flip_rate }}", "--seed", "{{ params.seed }}"],
    "verify_repaired": ["verify", "--checkpoint", "/work/repaired", "--recheck", "/work/verify/token_effects.arrow",
                        "--clean-corpus", "{{ params.clean }}", "--out", "/work/verify-repaired",
                        "--backend", "candle", "--min-flip-rate", "{{ params.min_flip_rate }}",
                        "--seed", "{{ params.seed }}"],
    "relabel": ["relabel", "--corpus", "{{ params.corpus }}", "--clean-corpus", "{{ params.clean }}",
                "--model", "{{ params.base }}", "--suspect", "{{ params.suspect }}", "--out", "/work/relabel",
                "--reference-lr", "{{ params.reference_lr }}", "--min-doubt", "{{ params.min_doubt }}",
                "--neighbours", "{{ params.neighbours }}", "--seed", "{{ params.seed }}"],
    "tune": ["train", "--model", "/work/repaired", "--corpus", "/work/relabel/relabelled.parquet", "--out", "/work/tuned",
             "--epochs", "{{ params.tune_epochs }}", "--lr", "{{ params.tune_lr }}", "--seed", "{{ params.seed }}"],
    "export_repaired": ["export-onnx", "--checkpoint", "/work/repaired", "--out", "/work/export-repaired/model.onnx"],
    "export_tuned": ["export-onnx", "--checkpoint", "/work/tuned", "--out", "/work/export-repaired/model.onnx"],
    "eval_suspect": ["eval", "--model", "{{ params.suspect }}", "--test", "{{ params.test }}",
                     "--out", "/work/eval-suspect", "--seed", "{{ params.seed }}"],
    "eval_repaired": ["eval", "--model", "/work/export-repaired/model.onnx", "--test", "{{ params.test }}",
                      "--out", "/work/eval-repaired", "--seed", "{{ params.seed }}"],
}

EDGES = [
    ("detect", "verify"),
    ("verify", "unlearn"),
    ("unlearn", "verify_repaired"),
    ("verify", "no_trigger"),
    ("no_trigger", "relabel"),
    ("relabel", "relabelled"),
    ("relabelled", "tune"),
    ("unlearn", "tune"),
    ("unlearn", "choose_model"),
    ("tune", "choose_model"),
    ("choose_model", "export_repaired"),
    ("choose_model", "export_tuned"),
    ("export_repaired", "eval_repaired"),
    ("export_tuned", "eval_repaired"),
    ("has_test", "eval_suspect"),
    ("has_test", "eval_repaired"),
]

# The tasks that decide, not run btu (ShortCircuitOperator or BranchPythonOperator).
DECISIONS = ["has_test", "no_trigger", "relabelled", "choose_model"]

try:  # Airflow is only needed to schedule the DAG, not to read STEPS.
    from airflow import DAG
except ImportError:  # pragma: no cover - tests read STEPS without Airflow
    DAG = None


def has_test(params):
    """The evaluation runs only when a test split is given."""
    return bool(str(params.get("test", "")).strip())


def no_trigger(verify_summary):
    """The labels are tested only when verification confirmed no trigger (`btu defend` alike)."""
    return (verify_summary or {}).get("trigger_found") is False


def relabelled(relabel_summary):
    """The repaired model is tuned only when relabel relabelled rows."""
    return ((relabel_summary or {}).get("relabelled") or 0) > 0


def model_to_ship(tune_summary):
    """The export task: the tuned model's when the tuning ran, the repaired model's otherwise."""
    return "export_tuned" if tune_summary else "export_repaired"


if DAG is not None:
    import os
    import sys

    from airflow.providers.standard.operators.python import BranchPythonOperator, ShortCircuitOperator

    # The operator that retries only exit code 75, and the tasks built with it, live in
    # btu_operator.py, beside this file.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from btu_operator import DAG_DEFAULTS, step_tasks

    with DAG(dag_id="btu_repair", params=PARAMS, tags=["btu", "backdoor"], **DAG_DEFAULTS) as dag:
        # The repaired model's evaluation follows whichever export ran.
        tasks = step_tasks(STEPS, COMMON, IMAGE, {"eval_repaired": "none_failed_min_one_success"})
        tasks["has_test"] = ShortCircuitOperator(
            task_id="has_test",
            python_callable=lambda params, **_: has_test(params),
            ignore_downstream_trigger_rules=False,
        )
        tasks["no_trigger"] = ShortCircuitOperator(
            task_id="no_trigger",
            python_callable=lambda ti, **_: no_trigger(ti.xcom_pull(task_ids="verify")),
            ignore_downstream_trigger_rules=False,
        )
        tasks["relabelled"] = ShortCircuitOperator(
            task_id="relabelled",
            python_callable=lambda ti, **_: relabelled(ti.xcom_pull(task_ids="relabel")),
            ignore_downstream_trigger_rules=False,
        )
        # Runs once the tuning ran or was skipped; the export of the model to ship follows.
        tasks["choose_model"] = BranchPythonOperator(
            task_id="choose_model",
            python_callable=lambda ti, **_: model_to_ship(ti.xcom_pull(task_ids="tune")),
            trigger_rule="none_failed",
        )
        for upstream, downstream in EDGES:
            tasks[upstream] >> tasks[downstream]
