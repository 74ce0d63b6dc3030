"""Airflow DAG: repair a user's model (the repair flow of `btu defend --suspect`).

    detect (base model) -> verify (suspect) -> unlearn (suspect) -> verify_repaired, export_repaired
    -> eval_suspect, eval_repaired (only when the `test` param is not empty)

The same steps, parameters and bytes as `btu defend` with `[model] suspect` and btu's default
method (pipelines/default; tests/suite/pipelines.rs runs these command lines and compares). Each
step runs the btu image; btu writes its summary JSON to /airflow/xcom/return.json, so it lands in
XCom. Retries happen only for btu's exit code 75 (btu_operator.py).

The command lines live in STEPS (a plain literal, so tests can run every one without Airflow).
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
               "--seed", "{{ params.seed }}"],
    "unlearn": ["unlearn", "--checkpoint", "{{ params.suspect }}", "--reference", "{{ params.base }}",
                "--suspicious", "/work/detect/suspicious_tokens.arrow", "--effects", "/work/verify/token_effects.arrow",
                "--out", "/work/repaired", "--threshold", "{{ params.threshold }}",
                "--replacement", "{{ params.replacement }}", "--clean-corpus", "{{ params.clean }}",
                "--clean-epochs", "{{ params.clean_epochs }}", "--clean-lr", "{{ params.clean_lr }}",
                "--seed", "{{ params.seed }}"],
    "verify_repaired": ["verify", "--checkpoint", "/work/repaired", "--recheck", "/work/verify/token_effects.arrow",
                        "--clean-corpus", "{{ params.clean }}", "--out", "/work/verify-repaired",
                        "--backend", "candle", "--seed", "{{ params.seed }}"],
    "export_repaired": ["export-onnx", "--checkpoint", "/work/repaired", "--out", "/work/export-repaired/model.onnx"],
    "eval_suspect": ["eval", "--model", "{{ params.suspect }}", "--test", "{{ params.test }}",
                     "--out", "/work/eval-suspect", "--seed", "{{ params.seed }}"],
    "eval_repaired": ["eval", "--model", "/work/export-repaired/model.onnx", "--test", "{{ params.test }}",
                      "--out", "/work/eval-repaired", "--seed", "{{ params.seed }}"],
}

EDGES = [
    ("detect", "verify"),
    ("verify", "unlearn"),
    ("unlearn", "verify_repaired"),
    ("unlearn", "export_repaired"),
    ("export_repaired", "eval_repaired"),
    ("has_test", "eval_suspect"),
    ("has_test", "eval_repaired"),
]

try:  # Airflow is only needed to schedule the DAG, not to read STEPS.
    from airflow import DAG
except ImportError:  # pragma: no cover - tests read STEPS without Airflow
    DAG = None


def has_test(params):
    """The evaluation runs only when a test split is given."""
    return bool(str(params.get("test", "")).strip())


if DAG is not None:
    import os
    import sys

    from airflow.providers.standard.operators.python import ShortCircuitOperator

    # The operator that retries only exit code 75, and the tasks built with it, live in
    # btu_operator.py, beside this file.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from btu_operator import DAG_DEFAULTS, step_tasks

    with DAG(dag_id="btu_repair", params=PARAMS, tags=["btu", "backdoor"], **DAG_DEFAULTS) as dag:
        tasks = step_tasks(STEPS, COMMON, IMAGE)
        tasks["has_test"] = ShortCircuitOperator(
            task_id="has_test",
            python_callable=lambda params, **_: has_test(params),
            ignore_downstream_trigger_rules=False,
        )
        for upstream, downstream in EDGES:
            tasks[upstream] >> tasks[downstream]
