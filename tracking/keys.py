"""Every metric key, tag and artifact name this project writes to MLflow, in one place."""

# Per-epoch metrics (step = epoch, starting at 1).
TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACCURACY, VAL_LOSS, VAL_ACCURACY)

# Final metrics of a configuration's run.
TEST_LOSS = "test_loss"
TEST_ACCURACY = "test_accuracy"
BEST_VAL_ACCURACY = "best_val_accuracy"
TRAIN_SECONDS = "train_seconds"
EPOCHS_RUN = "epochs_run"
BEST_EPOCH = "best_epoch"  # the logged model holds this epoch's weights (best validation accuracy)

# Metrics of the parent (study) run.
BEST_TEST_ACCURACY = "best_test_accuracy"

# Tags.
CONFIG_TAG = "config"
CONFIG_HASH_TAG = "config_hash"
BEST_CONFIG_TAG = "best_config"
REUSED_RUNS_TAG = "reused_runs"  # on a resumed parent: the run ids whose results it took over
ENTRY_POINT_TAG = "entry_point"
DIVERGED_TAG = "diverged"
STOPPED_REASON_TAG = "stopped_reason"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's UI: "Training runs", not GenAI mode

# Artifacts.
MODEL_NAME = "model"
LEARNING_CURVES = "learning_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
HISTORY = "history.json"
RESULTS_CSV = "results.csv"
COMPARISON_PNG = "comparison.png"
SUMMARY_MD = "summary.md"

# Statistics over seeds (study/statistics.py; on the parent run of `main` and in `report`'s folder).
TEST_PREDICTIONS = "test_predictions.npy"  # per child run: int8 predicted digit per test image (McNemar)
TEST_LABELS = "test_labels.npy"  # per child run: int8 true digit per test image, to pair predictions
STATISTICS_CSV = "statistics.csv"
COMPARISONS_CSV = "comparisons.csv"
TEST_ACCURACY_CI_PNG = "test_accuracy_ci.png"
VAL_ACCURACY_BAND_PNG = "val_accuracy_band.png"
TEST_ACCURACY_MEAN_PREFIX = "test_accuracy_mean/"  # parent metric per configuration: test_accuracy_mean/relu-hinge
REPORT_OUTPUT = "report"  # `report`'s default output folder

DEFAULT_EXPERIMENT = "mnist-activation-study"

# Optuna tuning (`optimize`): tags on each trial's run; artifacts on the parent run.
OPTUNA_STUDY_TAG = "optuna.study_name"
OPTUNA_TRIAL_NUMBER_TAG = "optuna.trial_number"
OPTUNA_TRIAL_STATE_TAG = "optuna.trial_state"  # RUNNING while it trains, then COMPLETE, PRUNED or FAIL
OPTUNA_REASON_TAG = "optuna.reason"  # why a trial was pruned or failed
TRIAL_MODEL_DIR = "trial_model"  # a kept trial's native .keras file (COMPLETE, best so far)
TRIAL_MODEL_FILE = "model.keras"
TUNED_RESULTS_CSV = "tuned_results.csv"
OPTUNA_PLOTS_DIR = "optuna"  # optuna/{config}/<plot>.png
OPTIMIZATION_HISTORY_PNG = "optimization_history.png"
PARAM_IMPORTANCES_PNG = "param_importances.png"
PARALLEL_COORDINATE_PNG = "parallel_coordinate.png"

# Model registry (tracking/registry.py): each configuration's model becomes a version of this model.
DEFAULT_REGISTERED_MODEL = "mnist-mlp"
NO_REGISTRATION = "none"  # --registered-model none: log models but register nothing
CHAMPION_ALIAS = "champion"  # the version with the highest validation accuracy under the name
DEFAULT_PREDICT_MODEL = f"models:/{DEFAULT_REGISTERED_MODEL}@{CHAMPION_ALIAS}"
# Version tags.
VERSION_ACTIVATION_TAG = "activation"
VERSION_LOSS_TAG = "loss"
VERSION_SEED_TAG = "seed"
VERSION_VAL_ACCURACY_TAG = "val_accuracy"  # the registered (final-epoch) model's validation accuracy
VERSION_TEST_ACCURACY_TAG = "test_accuracy"
VERSION_SOURCE_TAG = "source"  # main or optimize
CHAMPION_DECISION_TAG = "champion_decision"  # on the version: why the champion alias moved or stayed
# Run tag on a configuration's run: `{registered model}/{version}` it was registered as.
REGISTERED_VERSION_TAG = "registered_model_version"

# Unsynced records (tracking/unsynced.py): results kept locally while the tracking store was unreachable,
# uploaded later by `python -m study sync`.
UNSYNCED_DIR_ENV = "MNIST_UNSYNCED_DIR"
DEFAULT_UNSYNCED_DIR = "unsynced"
UNSYNCED_RECORD_FILE = "run.json"
UNSYNCED_ARTIFACTS_DIR = "artifacts"
UNSYNCED_MODEL_FILE = "model.keras"
# MLflow's HTTP client retries a failed call 7 times with backoff factor 2 and a 120 s timeout: minutes per
# call against a dead server. The CLI sets these defaults instead (a user's own settings win), so a dead
# server costs a second or two per call and the results go to an unsynced record.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
