"""The MLflow sink: experiment = preset, one MLflow run per run key, on any tracking URI.

A run is created at its start with the config as params (every field, unset ones as "None", and the seed) and tags
`cdgrad.key`, `cdgrad.seed`, `cdgrad.kernel`, `mlflow.source.git.commit` (and `cdgrad.preset`); its MLflow run id
is kept in the checkpoint, so a resumed run (kill -9, requeue) continues the same MLflow run. Metrics (the same
names as the TensorBoard sink's, at the optimizer step) are buffered and sent in batches after every epoch (and
every `flush_secs` within one), each batch with the tag `cdgrad.logged_step` = the last step it completes; a
resumed run sends only steps after that tag, so no step is logged twice. At the end come `final/<metric>`, the
status tag `cdgrad.status` and the run's end (FINISHED). `log_artifacts` puts the report's tables and plots in a run of
their own, "<preset> report" (tag `cdgrad.kind` = report), found again and updated by later reports.

Without a server, a `sqlite:///<file>` URI keeps everything in one file (artifacts in `mlartifacts/` beside it;
MLflow 3 refuses its plain file store unless told to allow it). The HTTP client's retries are lowered to
`MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`, backoff factor 1, timeout 30 s unless those variables are set, so a server
that is down costs a few seconds and one warning, not minutes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cdgrad.experiments.config import to_dict
from cdgrad.experiments.tracking import RunInfo, Sink

__all__ = ["MlflowSink", "default_uri", "find_runs"]

BATCH = 1000  # MLflow's limit of metrics per log_batch request
LOGGED = "cdgrad.logged_step"
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def default_uri(results: str) -> str:
    """`sqlite:///<results>/mlflow.db` (absolute)."""
    return "sqlite:///" + os.path.abspath(os.path.join(results, "mlflow.db"))


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite URI, `<folder of the database>/mlartifacts/<experiment>` (as a file URI); else the server's."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :]
    return Path(os.path.dirname(os.path.abspath(db)), "mlartifacts", experiment).as_uri()


def find_runs(client: Any, experiment_id: str, **tags: str) -> list[Any]:
    """The runs of `experiment_id` with these tag values (dots in names written as `__`: cdgrad__key=...)."""
    terms = " and ".join(f"tags.`{k.replace('__', '.')}` = '{v}'" for k, v in tags.items())
    return list(client.search_runs([experiment_id], filter_string=terms, max_results=1000))


class MlflowSink(Sink):
    """Logs each run to an MLflow run in experiment `experiment` on tracking URI `uri`."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, flush_secs: float = 30.0) -> None:
        self.uri = uri
        self.experiment = experiment
        self.flush_secs = flush_secs
        self.sent_at = time.time()
        self.client: Any = None
        self.run_id: str | None = None
        self.logged = 0  # steps up to this one are on the server
        self.resumed_at = 0  # ... and were there when this run (re)started: a resumed run skips them
        self.final_logged = False
        self.buffer: list[Any] = []
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)

    # ------------------------------------------------------------------------------------------ plumbing
    def _client(self) -> Any:
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    def _experiment_id(self) -> str:
        """The experiment's id, created if missing (another process creating it at the same moment is fine)."""
        from mlflow.exceptions import MlflowException

        client = self._client()
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return str(client.create_experiment(self.experiment, _artifact_location(self.uri, self.experiment)))
            except MlflowException:  # created meanwhile by another process
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)

    def _send(self, metrics: list[Any], tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        client = self._client()
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        if not metrics:
            if run_tags:
                client.log_batch(self.run_id, tags=run_tags)
            return
        # batches end at a step boundary, each tagged with the last step it completes
        chunk: list[Any] = []
        for i, metric in enumerate(metrics):
            chunk.append(metric)
            last = i + 1 == len(metrics)
            if last or (len(chunk) >= BATCH - 16 and metrics[i + 1].step != metric.step):
                done = {LOGGED: str(metric.step)} if metric.step > self.logged else {}
                client.log_batch(self.run_id, metrics=chunk, tags=[*([RunTag(k, v) for k, v in done.items()])])
                self.logged = max(self.logged, metric.step)
                chunk = []
        if run_tags:
            client.log_batch(self.run_id, tags=run_tags)

    def _buffer(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        if step <= self.resumed_at:  # on the server already (a resumed run repeats the steps after its checkpoint)
            return
        now = time.time()
        if now - self.sent_at >= self.flush_secs:  # within an epoch: the steps before this one, which are complete
            self.flush(before=step)
        self.buffer.extend(Metric(prefix + k, float(v), int(now * 1000), step) for k, v in metrics.items())

    def flush(self, before: int | None = None) -> None:
        """Send the buffered metrics (of the steps before `before` only, when given)."""
        keep = [m for m in self.buffer if before is not None and m.step >= before]
        send = [m for m in self.buffer if before is None or m.step < before]
        self.buffer, self.sent_at = keep, time.time()
        self._send(send, {})

    # ------------------------------------------------------------------------------------------ protocol
    def start(self, run: RunInfo, state: Mapping[str, Any] | None) -> None:
        from mlflow.entities import Param, RunTag

        self.buffer, self.run_id, self.logged, self.final_logged, self.resumed_at = [], None, 0, False, 0
        client = self._client()
        experiment_id = self._experiment_id()
        run_id = (state or {}).get("run_id")
        if run_id is None:  # a run killed before its first checkpoint left an empty run: take it over
            for found in find_runs(client, experiment_id, cdgrad__key=run.key):
                if found.info.status != "FINISHED" and LOGGED not in found.data.tags:
                    run_id = found.info.run_id
                    break
        existing = None
        if run_id is not None:
            from mlflow.exceptions import MlflowException

            try:
                existing = client.get_run(run_id)
            except MlflowException:  # deleted, or another tracking server: a new MLflow run
                run_id = None
        if run_id is not None and existing is not None:
            self.run_id = run_id
            self.logged = self.resumed_at = int(existing.data.tags.get(LOGGED, "0"))
            self.final_logged = existing.data.tags.get("cdgrad.final") == "1"
            client.update_run(run_id, status="RUNNING")
            if existing.data.params:
                return
        else:
            from cdgrad.experiments.store import environment

            env = environment(run.config)
            tags = {
                "cdgrad.key": run.key,
                "cdgrad.seed": str(run.seed),
                "cdgrad.kernel": str(env.get("kernel")),
                "mlflow.source.git.commit": str(env.get("git_commit")),
                **({"cdgrad.preset": run.preset} if run.preset else {}),
            }
            created = client.create_run(experiment_id, tags=tags, run_name=run.key)
            self.run_id = created.info.run_id
        params = [Param(k, str(v)) for k, v in {**to_dict(run.config), "seed": run.seed}.items()]
        for i in range(0, len(params), 100):  # MLflow's limit of params per request
            client.log_batch(self.run_id, params=params[i : i + 100], tags=[RunTag("cdgrad.params", "1")])

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self._buffer(step, metrics, "step/")

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self._buffer(step, metrics)
        self.flush()

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {"run_id": self.run_id}

    def end(self, final: Mapping[str, float], status: str) -> None:
        from mlflow.entities import Metric

        buffer, self.buffer = self.buffer, []
        step = max([self.logged, *(m.step for m in buffer)])
        if not self.final_logged:
            now = int(time.time() * 1000)
            buffer.extend(Metric(f"final/{k}", float(v), now, step) for k, v in final.items())
        self._send(buffer, {"cdgrad.status": status, "cdgrad.final": "1"})
        self._client().set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def abort(self) -> None:
        """Steps after the last checkpoint are dropped (a resume logs them); the run is marked KILLED."""
        run_id = self.run_id
        self.close()
        if run_id is not None and self.client is not None:
            self.client.set_terminated(run_id, "KILLED")

    def close(self) -> None:
        self.run_id, self.buffer = None, []

    def log_artifacts(self, name: str, paths: Sequence[str]) -> None:
        """`paths` into the preset's report run (created once, updated by every later report)."""
        client = self._client()
        experiment_id = self._experiment_id()
        found = find_runs(client, experiment_id, cdgrad__kind="report")
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {"cdgrad.kind": "report", "cdgrad.preset": name}
            run_id = client.create_run(experiment_id, tags=tags, run_name=f"{name} report").info.run_id
        for path in paths:
            client.log_artifact(run_id, path)
        client.set_terminated(run_id, "FINISHED")
