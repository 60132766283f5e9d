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

# Metrics of the parent (study) run.
BEST_TEST_ACCURACY = "best_test_accuracy"

# Tags.
CONFIG_TAG = "config"
CONFIG_HASH_TAG = "config_hash"
BEST_CONFIG_TAG = "best_config"
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

DEFAULT_EXPERIMENT = "mnist-activation-study"
