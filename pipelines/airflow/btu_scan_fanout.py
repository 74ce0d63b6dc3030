"""Airflow DAG: audit a lake with btu scan, fanned out over shards by dynamic task mapping.

    plan (btu scan --plan) -> scan, one mapped task per shard -> merge (btu sql)

The plan task prints the shard list; btu writes its summary (here: that list) to
/airflow/xcom/return.json, which KubernetesPodOperator's XCom sidecar pushes, so `plan.output` is
the list and `.map(scan_arguments)` turns each item into one scan task's command line. Each scan
pod reads its shard (`--shard I/N`) from the object store and uploads its flagged rows as one
object, visible only once complete; merge joins them in (source, row) order, equal row for row to
an unsharded scan. Retries happen only for btu's exit code 75 (btu_operator.py); a retry rewrites
the same bytes (--overwrite). Give every run its own `out` prefix.

The command lines are plain literals (PLAN, SCAN, MERGE) so tests can run them against a real
S3-compatible server and check them with btu's own argument parser.
"""

IMAGE = "btu:0.1.0"

PARAMS = {
    "corpus": "s3://lake/corpora/",
    "suspicious": "/models/audit/suspicious_tokens.arrow",
    "tokenizer": "/models/all-MiniLM-L6-v2",
    "shards": "8",
    "out": "s3://lake/audit/run-1",
}

COMMON = ["--quiet"]

PLAN = ["scan", "--plan", "--corpus", "{{ params.corpus }}", "--shards", "{{ params.shards }}"]

# [shard] and [index] are filled per item of the plan by scan_arguments.
SCAN = ["scan", "--corpus", "{{ params.corpus }}", "--shard", "[shard]",
        "--suspicious", "{{ params.suspicious }}", "--tokenizer", "{{ params.tokenizer }}",
        "--out", "{{ params.out }}/shards/shard-[index].parquet", "--overwrite"]

MERGE = ["sql", "--table", "flagged_rows={{ params.out }}/shards/*.parquet",
         "SELECT * FROM flagged_rows ORDER BY source, row",
         "--format", "parquet", "--output", "{{ params.out }}/flagged_rows.parquet", "--overwrite"]


def scan_arguments(item):
    """The scan task's command line for one item of `btu scan --plan`'s list."""
    return [a.replace("[shard]", item["shard"]).replace("[index]", str(item["index"])) for a in SCAN] + COMMON


try:  # Airflow is only needed to schedule the DAG, not to read the command lines.
    from airflow import DAG
except ImportError:  # pragma: no cover - tests read the literals without Airflow
    DAG = None


if DAG is not None:
    import os
    import sys

    from kubernetes.client import models as k8s

    # The operator that retries only exit code 75 lives in btu_operator.py, beside this file.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from btu_operator import DAG_DEFAULTS, BtuPodOperator

    store = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="btu-object-store"))]
    pod = {"image": IMAGE, "cmds": ["btu"], "env_from": store, "get_logs": True}

    with DAG(dag_id="btu_scan_fanout", params=PARAMS, tags=["btu", "audit"], **DAG_DEFAULTS) as dag:
        plan = BtuPodOperator(task_id="plan", name="btu-plan", arguments=PLAN + COMMON, do_xcom_push=True, **pod)
        scan = BtuPodOperator.partial(task_id="scan", name="btu-scan", do_xcom_push=True, **pod).expand(
            arguments=plan.output.map(scan_arguments)
        )
        merge = BtuPodOperator(task_id="merge", name="btu-merge", arguments=MERGE + COMMON, do_xcom_push=True, **pod)
        plan >> scan >> merge
