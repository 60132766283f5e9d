"""Results the tracking store could not take, kept in a local folder until `python -m study sync`.

One folder per run, `<root>/<run name>-<time>/` (root: $MNIST_UNSYNCED_DIR, else ./unsynced):
- run.json: the tracking URI (password redacted), experiment id, parent run id, run id (if the run was
  created), run name, params, tags, every epoch metric with its step, the final metrics, the final status,
  and which parts already reached the store (`done`), so a sync never logs a part twice;
- artifacts/: the run's artifacts (plots, history.json, predictions; the parent's results and summary);
- model.keras: the trained model in Keras's native format (a configuration's record only).

A record is written to `<folder>.partial` and renamed when complete, so `sync` never reads half of one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from mlflow.entities import Metric

from tracking import keys
from tracking.reliability import redact, scrub

log = logging.getLogger(__name__)

FORMAT = 1
PARTIAL_SUFFIX = ".partial"

# What a record is for: a configuration's run, the parent (study) run's results, or only a final status.
CONFIGURATION = "configuration"
PARENT = "parent"
STATUS = "status"

# Parts of a run that may already be in the store (Record.done).
EPOCHS = "epochs"
FINAL = "final"
ARTIFACTS = "artifacts"
MODEL = "model"
REGISTERED = "registered"


@dataclass
class Record:
    """What run.json holds: everything needed to log the run as if the store had never gone away."""

    kind: str
    tracking_uri: str
    experiment_id: str
    run_name: str
    run_id: str | None = None
    parent_run_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    epoch_metrics: list[dict] = field(default_factory=list)  # {key, value, timestamp, step}, step = epoch
    final_metrics: list[dict] = field(default_factory=list)
    status: str = "FINISHED"
    config: dict | None = None  # TrainConfig's fields: to register the model like `main` would
    registered_model: str | None = None
    done: list[str] = field(default_factory=list)
    model_id: str | None = None  # the logged model, once sync has logged it
    reason: str = ""
    written: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))
    format: int = FORMAT

    def __post_init__(self) -> None:
        self.tracking_uri = redact(self.tracking_uri)
        self.reason = scrub(self.reason)


def metric_rows(metrics: Iterable[Metric]) -> list[dict]:
    return [
        {"key": metric.key, "value": metric.value, "timestamp": metric.timestamp, "step": metric.step}
        for metric in metrics
    ]


def metrics_of(rows: Iterable[dict]) -> list[Metric]:
    return [Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"])) for row in rows]


def root() -> Path:
    """Where records go: $MNIST_UNSYNCED_DIR, else ./unsynced (absolute, so messages name it exactly)."""
    return Path(os.environ.get(keys.UNSYNCED_DIR_ENV) or keys.DEFAULT_UNSYNCED_DIR).resolve()


_written: dict[Path, Record] = {}  # this process's records (the CLI's exit code and message)


def written() -> list[Path]:
    """The records this process wrote and that are still on disk."""
    return [folder for folder in _written if folder.is_dir()]


def has_record(run_id: str) -> bool:
    return any(record.run_id == run_id for record in _written.values())


def write(record: Record, artifacts: Path | None = None, model_path: str | None = None) -> Path:
    """Write `record` (with a copy of the `artifacts` folder and the model file) as a new folder."""
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", record.run_name or "") or "run"
    folder = base / f"{name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    partial.mkdir()
    if artifacts is not None:
        shutil.copytree(artifacts, partial / keys.UNSYNCED_ARTIFACTS_DIR)
    if model_path:
        shutil.copyfile(model_path, partial / keys.UNSYNCED_MODEL_FILE)
    _dump(record, partial / keys.UNSYNCED_RECORD_FILE)
    partial.rename(folder)
    _written[folder] = record
    log.warning(
        "Tracking store %s unreachable: %s's results are kept in %s; upload them with `python -m study sync` "
        "once it is back",
        record.tracking_uri,
        record.run_name,
        folder,
    )
    return folder


def update(folder: Path, record: Record) -> None:
    """Rewrite run.json (atomically): what `sync` has already logged survives a failed or killed sync."""
    _dump(record, folder / keys.UNSYNCED_RECORD_FILE)


def read(folder: Path) -> Record:
    data = json.loads((folder / keys.UNSYNCED_RECORD_FILE).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{folder}: record format {data.get('format')!r}; this version reads {FORMAT}")
    return Record(**data)


def list_records(base: Path) -> list[Path]:
    """The complete records under `base`, oldest first (their names end in the time they were written)."""
    if not base.is_dir():
        return []
    folders = [
        path
        for path in base.iterdir()
        if path.is_dir() and not path.name.endswith(PARTIAL_SUFFIX) and (path / keys.UNSYNCED_RECORD_FILE).is_file()
    ]
    return sorted(folders, key=lambda path: (read_written(path), path.name))


def read_written(folder: Path) -> str:
    try:
        return json.loads((folder / keys.UNSYNCED_RECORD_FILE).read_text()).get("written", "")
    except (OSError, ValueError):
        return ""


def _dump(record: Record, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2))
    os.replace(temporary, path)
