"""The KubernetesPodOperator the btu DAGs run their steps with: it retries only btu's exit code 75
("temporary failure, worth a retry", e.g. an object-store timeout); any other failing exit code
(bad data 65, missing input 66, output exists 73, bad config 78, ...) fails the task at once.

A module of its own, beside the DAG files that import it (it defines no DAG).
"""

from datetime import datetime, timedelta

from airflow.exceptions import AirflowException, AirflowFailException
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

TEMPORARY_FAILURE = 75

# What every btu DAG shares: triggered by hand or by an upstream DAG, no backfill, three retries
# with exponential backoff (for exit code 75 only, see BtuPodOperator).
DAG_DEFAULTS = {
    "start_date": datetime(2026, 1, 1),
    "schedule": None,
    "catchup": False,
    "default_args": {"retries": 3, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True},
}


class BtuPodOperator(KubernetesPodOperator):
    """Retries only btu's temporary failures (exit code 75)."""

    def execute(self, context):
        try:
            return super().execute(context)
        except AirflowException as err:
            code = self._btu_exit_code()
            if code is not None and code != TEMPORARY_FAILURE:
                raise AirflowFailException(f"btu exited with {code} (not retryable): {err}") from err
            raise

    def _btu_exit_code(self):
        pod = getattr(self, "pod", None)
        if pod is None:
            return None
        try:
            remote = self.pod_manager.read_pod(pod)
            for status in remote.status.container_statuses or []:
                if status.name == "base" and status.state and status.state.terminated:
                    return status.state.terminated.exit_code
        except Exception:  # noqa: BLE001 - unknown state: let Airflow's retry decide
            return None
        return None


def step_tasks(steps, common, image, trigger_rules=None):
    """One BtuPodOperator per entry of `steps` (task id -> btu arguments), each with `common`
    appended, the shared work volume (PVC btu-work) at /work, its summary pushed to XCom and its
    trigger rule from `trigger_rules` (task id -> rule; Airflow's all_success otherwise)."""
    from kubernetes.client import models as k8s

    work = k8s.V1Volume(name="work", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name="btu-work"))
    work_mount = k8s.V1VolumeMount(name="work", mount_path="/work")
    return {
        name: BtuPodOperator(
            task_id=name,
            name=f"btu-{name.replace('_', '-')}",
            image=image,
            cmds=["btu"],
            arguments=args + common,
            volumes=[work],
            volume_mounts=[work_mount],
            do_xcom_push=True,
            get_logs=True,
            trigger_rule=(trigger_rules or {}).get(name, "all_success"),
        )
        for name, args in steps.items()
    }
