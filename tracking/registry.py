"""The model registry: every configuration's model as a version of one registered model, with aliases.

Aliases (MLflow aliases, not stages):
- `champion`: the version with the highest validation accuracy among everything registered under the name;
- `{activation}-{loss}` (e.g. `relu-hinge`): that configuration's best version.
An alias moves only when a newly registered version beats the version it points to on validation
accuracy (ties keep the older version), so a worse model never takes it. The decision is logged and
written as a tag on the new version.

`main` registers through `ConfigRuns(registered_model=...)`; other entry points (e.g. `optimize`) call
`register_version` with the URI of a model they logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from study.config import TrainConfig
from study.runner import Outcome
from tracking import keys

log = logging.getLogger(__name__)

SOURCES = ("main", "optimize")
MODEL_DESCRIPTION = (
    "MNIST MLP (784 -> 128 -> 64 -> 10 softmax): input float32 rows of 784 pixels in [0, 1] "
    "(white digit on black), output 10 class probabilities."
)


class RegistryError(LookupError):
    """A registered model or version that is not there; the message says what is."""


@dataclass(frozen=True)
class VersionRow:
    """One registered version as the `models` table shows it."""

    version: int
    aliases: tuple[str, ...]
    activation: str
    loss: str
    seed: str
    val_accuracy: float
    test_accuracy: float
    source: str
    created: datetime
    run_id: str

    @property
    def config(self) -> str:
        return f"{self.activation}-{self.loss}"


def register_outcome(registered_model: str, model_info: ModelInfo, outcome: Outcome, run_id: str) -> ModelVersion:
    """Register a `main` configuration's logged model (its validation accuracy: the best epoch's, whose
    weights the model holds)."""
    return register_version(
        registered_model,
        model_info.model_uri,
        outcome.config,
        val_accuracy=outcome.best_val_accuracy,
        test_accuracy=outcome.test_accuracy,
        source="main",
        run_id=run_id,
        model_id=model_info.model_id,
    )


def register_version(
    registered_model: str,
    model_uri: str,
    config: TrainConfig,
    val_accuracy: float,
    test_accuracy: float,
    source: str,
    run_id: str | None = None,
    model_id: str | None = None,
) -> ModelVersion:
    """Register `model_uri` (e.g. `ModelInfo.model_uri`) as a new version, tag it, then update the aliases.

    `val_accuracy` is the registered model's own validation accuracy; it decides the aliases. A
    non-finite value (a diverged model) is registered but never takes an alias.
    """
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} is not allowed; choose one of {', '.join(SOURCES)}")
    client = MlflowClient()
    _ensure_registered_model(client, registered_model)
    tags = {
        keys.VERSION_ACTIVATION_TAG: config.activation,
        keys.VERSION_LOSS_TAG: config.loss,
        keys.VERSION_SEED_TAG: str(config.seed),
        keys.VERSION_VAL_ACCURACY_TAG: _format_accuracy(val_accuracy),
        keys.VERSION_TEST_ACCURACY_TAG: _format_accuracy(test_accuracy),
        keys.VERSION_SOURCE_TAG: source,
    }
    description = (
        f"{config.name}, seed {config.seed}, {config.epochs} epochs, batch size {config.batch_size}, "
        f"learning rate {config.learning_rate} (from {source}): validation accuracy {val_accuracy:.4f}, "
        f"test accuracy {test_accuracy:.4f}"
    )
    version = client.create_model_version(
        registered_model,
        model_uri,
        run_id=run_id,
        tags=tags,
        description=description,
        model_id=model_id or logged_model_id(model_uri),  # a tracking server requires it for models:/m-...
    )
    log.info("Registered %s as %s version %s (%s)", model_uri, registered_model, version.version, config.name)
    if run_id:
        client.set_tag(run_id, keys.REGISTERED_VERSION_TAG, f"{registered_model}/{version.version}")
    update_aliases(registered_model, version, client)
    return version


def logged_model_id(model_uri: str) -> str | None:
    """`models:/m-0123...` (a logged model's URI) -> `m-0123...`; None for any other URI."""
    rest = model_uri.removeprefix("models:/")
    if rest != model_uri and rest.startswith("m-") and not any(mark in rest for mark in "/@"):
        return rest
    return None


def update_aliases(registered_model: str, new: ModelVersion, client: MlflowClient | None = None) -> str:
    """Point `champion` and `{activation}-{loss}` at the best versions; returns the champion decision."""
    client = client or MlflowClient()
    versions = all_versions(registered_model, client)
    decision = _move_alias(client, registered_model, keys.CHAMPION_ALIAS, versions, new)
    client.set_model_version_tag(registered_model, new.version, keys.CHAMPION_DECISION_TAG, decision)
    activation = new.tags.get(keys.VERSION_ACTIVATION_TAG)
    loss = new.tags.get(keys.VERSION_LOSS_TAG)
    if activation and loss:
        same_config = [
            version
            for version in versions
            if version.tags.get(keys.VERSION_ACTIVATION_TAG) == activation
            and version.tags.get(keys.VERSION_LOSS_TAG) == loss
        ]
        _move_alias(client, registered_model, f"{activation}-{loss}", same_config, new)
    return decision


def _move_alias(client: MlflowClient, name: str, alias: str, candidates: list[ModelVersion], new: ModelVersion) -> str:
    """Move `alias` to the best candidate only if it beats the alias's current version; say what happened."""
    best = _best(candidates)
    current = _version_by_alias(client, name, alias)
    new_accuracy = version_val_accuracy(new)
    if best is None:
        decision = f"{alias}: not set; no version of {name} has a finite validation accuracy"
    elif current is None:
        client.set_registered_model_alias(name, alias, best.version)
        decision = (
            f"{alias}: set to version {best.version} (val_accuracy {version_val_accuracy(best):.4f}); it had no version"
        )
    elif _rank(best)[0] > _rank(current)[0]:  # strictly better: a tie keeps the current version
        client.set_registered_model_alias(name, alias, best.version)
        decision = (
            f"{alias}: moved from version {current.version} (val_accuracy {version_val_accuracy(current):.4f}) "
            f"to version {best.version} (val_accuracy {version_val_accuracy(best):.4f})"
        )
    else:
        decision = (
            f"{alias}: stays at version {current.version} (val_accuracy {version_val_accuracy(current):.4f}); "
            f"version {new.version} has val_accuracy {new_accuracy:.4f}"
        )
    log.info("%s %s", name, decision)
    return decision


def _best(versions: Iterable[ModelVersion]) -> ModelVersion | None:
    """The highest finite validation accuracy; among equals, the oldest version."""
    finite = [version for version in versions if math.isfinite(version_val_accuracy(version))]
    return max(finite, key=_rank) if finite else None


def _rank(version: ModelVersion) -> tuple[float, int]:
    accuracy = version_val_accuracy(version)
    return (accuracy if math.isfinite(accuracy) else -math.inf, -int(version.version))


def version_val_accuracy(version: ModelVersion) -> float:
    return _parse_accuracy(version.tags.get(keys.VERSION_VAL_ACCURACY_TAG))


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or "not found" in str(error).lower():
            return None
        raise


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
        log.info("Created registered model %s", name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def all_versions(registered_model: str, client: MlflowClient | None = None) -> list[ModelVersion]:
    """Every version of the registered model (all pages), oldest first; RegistryError if there is no such model."""
    client = client or MlflowClient()
    get_registered_model(registered_model, client)
    escaped = registered_model.replace("'", "\\'")
    versions: list[ModelVersion] = []
    page_token = None
    while True:
        page = client.search_model_versions(f"name = '{escaped}'", max_results=1000, page_token=page_token)
        versions += page
        page_token = page.token
        if not page_token:
            break
    return sorted(versions, key=lambda version: int(version.version))


def get_registered_model(registered_model: str, client: MlflowClient | None = None) -> RegisteredModel:
    """The registered model, or RegistryError naming the ones there are."""
    client = client or MlflowClient()
    try:
        return client.get_registered_model(registered_model)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise RegistryError(_no_such_model(client, registered_model)) from None
        raise


def _no_such_model(client: MlflowClient, name: str) -> str:
    names = sorted(model.name for model in client.search_registered_models(max_results=100))
    known = f"registered: {', '.join(names)}" if names else "nothing is registered yet (run main first)"
    return f"registered_model: no registered model named {name!r}; {known}"


def version_rows(registered_model: str) -> list[VersionRow]:
    """The registered versions with their aliases, configuration and accuracies."""
    client = MlflowClient()
    aliases: dict[str, list[str]] = {}
    for alias, version in get_registered_model(registered_model, client).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for version in all_versions(registered_model, client):
        tags = version.tags
        names = set(aliases.get(str(version.version), ())) | set(version.aliases or ())
        rows.append(
            VersionRow(
                version=int(version.version),
                aliases=tuple(sorted(names, key=lambda alias: (alias != keys.CHAMPION_ALIAS, alias))),
                activation=tags.get(keys.VERSION_ACTIVATION_TAG, "?"),
                loss=tags.get(keys.VERSION_LOSS_TAG, "?"),
                seed=tags.get(keys.VERSION_SEED_TAG, "?"),
                val_accuracy=_parse_accuracy(tags.get(keys.VERSION_VAL_ACCURACY_TAG)),
                test_accuracy=_parse_accuracy(tags.get(keys.VERSION_TEST_ACCURACY_TAG)),
                source=tags.get(keys.VERSION_SOURCE_TAG, "?"),
                created=datetime.fromtimestamp(version.creation_timestamp / 1000),
                run_id=version.run_id or "",
            )
        )
    return rows


def versions_table(registered_model: str, rows: list[VersionRow]) -> str:
    """A fixed-width console table of `rows`, newest first."""
    header = (
        f"{'version':>7}  {'config':<22}{'seed':>5}{'val acc':>9}{'test acc':>10}  {'source':<9}"
        f"{'created':<17}  aliases"
    )
    lines = [f"Registered model {registered_model}: {len(rows)} version(s)", header, "-" * (len(header) + 10)]
    for row in sorted(rows, key=lambda row: -row.version):
        lines.append(
            f"{row.version:>7}  {row.config:<22}{row.seed:>5}{row.val_accuracy:>9.4f}{row.test_accuracy:>10.4f}  "
            f"{row.source:<9}{row.created:%Y-%m-%d %H:%M}  {', '.join(row.aliases)}"
        )
    return "\n".join(lines)


def _format_accuracy(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else "nan"


def _parse_accuracy(text: str | None) -> float:
    try:
        return float(text) if text is not None else float("nan")
    except ValueError:
        return float("nan")
