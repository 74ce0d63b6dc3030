"""Airflow DAG: btu's defence as KubernetesPodOperator steps.

    detect -> train -> unlearn -> export-onnx -> eval (victim and repaired)

Each step runs the btu image. btu writes its summary JSON to /airflow/xcom/return.json when that
directory exists, which is where KubernetesPodOperator's XCom sidecar reads it (do_xcom_push=True),
so every step's summary lands in XCom. Retries happen only for btu's exit code 75 ("temporary
failure, worth a retry"); any other failing exit code fails the task at once.

The command lines live in STEPS (a plain literal, so tests can check every one against btu's own
argument parser without Airflow installed).
"""

IMAGE = "btu:0.1.0"

PARAMS = {
    "corpus": "s3://lake/sst2/poisoned-train.parquet",
    "dev": "s3://lake/sst2/dev.parquet",
    "test": "s3://lake/sst2/test.parquet",
    "clean": "s3://lake/sst2/dev.parquet",
    "model": "/models/all-MiniLM-L6-v2",
    "preset": "paper",
    "alpha": "0.05",
    "epochs": "3",
    "lr": "2e-5",
    "trigger": "cf",
    "target": "1",
    "seed": "42",
}

COMMON = ["--overwrite", "--quiet"]

STEPS = {
    "detect": ["detect", "--corpus", "{{ params.corpus }}", "--model", "{{ params.model }}",
               "--out", "/work/detect", "--preset", "{{ params.preset }}", "--alpha", "{{ params.alpha }}",
               "--seed", "{{ params.seed }}"],
    "train": ["train", "--corpus", "{{ params.corpus }}", "--dev", "{{ params.dev }}", "--model", "{{ params.model }}",
              "--out", "/work/victim", "--epochs", "{{ params.epochs }}", "--lr", "{{ params.lr }}",
              "--seed", "{{ params.seed }}"],
    "unlearn": ["unlearn", "--checkpoint", "/work/victim", "--reference", "{{ params.model }}",
                "--suspicious", "/work/detect/suspicious_tokens.arrow", "--out", "/work/repaired",
                "--clean-corpus", "{{ params.clean }}", "--eval-split", "{{ params.test }}", "--seed", "{{ params.seed }}"],
    "export_victim": ["export-onnx", "--checkpoint", "/work/victim", "--out", "/work/onnx-victim/model.onnx"],
    "export_repaired": ["export-onnx", "--checkpoint", "/work/repaired", "--out", "/work/onnx-repaired/model.onnx"],
    "eval_victim": ["eval", "--model", "/work/onnx-victim/model.onnx", "--test", "{{ params.test }}",
                    "--out", "/work/eval-victim", "--attack", "add-word", "--trigger", "{{ params.trigger }}",
                    "--target", "{{ params.target }}", "--seed", "{{ params.seed }}"],
    "eval_repaired": ["eval", "--model", "/work/onnx-repaired/model.onnx", "--test", "{{ params.test }}",
                      "--out", "/work/eval-repaired", "--attack", "add-word", "--trigger", "{{ params.trigger }}",
                      "--target", "{{ params.target }}", "--seed", "{{ params.seed }}"],
}

EDGES = [
    ("detect", "unlearn"),
    ("train", "unlearn"),
    ("train", "export_victim"),
    ("unlearn", "export_repaired"),
    ("export_victim", "eval_victim"),
    ("export_repaired", "eval_repaired"),
]

try:  # Airflow is only needed to schedule the DAG, not to read STEPS.
    from airflow import DAG
except ImportError:  # pragma: no cover - tests read STEPS without Airflow
    DAG = None


if DAG is not None:
    import os
    import sys

    # The operator that retries only exit code 75, and the tasks built with it, live in
    # btu_operator.py, beside this file.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from btu_operator import DAG_DEFAULTS, step_tasks

    with DAG(dag_id="btu_defend", params=PARAMS, tags=["btu", "backdoor"], **DAG_DEFAULTS) as dag:
        tasks = step_tasks(STEPS, COMMON, IMAGE)
        for upstream, downstream in EDGES:
            tasks[upstream] >> tasks[downstream]
