"""The names of what medseg logs to a run, in one place (writers and readers share them)."""

CONFIG = "config.json"  # the resolved config (medseg reproduce)
PLAN = "plan.json"  # what prediction needs besides the model (PredictionPlan)
EXPERIMENT_PLAN = "experiment_plan.json"  # the plan as it ran (ExperimentPlan)
PLAN_OVERRIDES = "plan_overrides.json"
FINGERPRINT = "fingerprint.json"
SPLIT = "split.json"
HISTORY = "training/history.tsv"
VALIDATION_CASES = "evaluation/validation_cases.tsv"
# the same per-case scores in MLflow's table format: the UI renders it as a table and
# mlflow.load_table reads it (the TSVs stay for the readers above and for people)
VALIDATION_TABLE = "evaluation/validation_cases.json"
CASES_TABLE = "evaluation/cases.json"
POSTPROCESSING = "postprocessing.json"  # in "evaluation/" for a run, at the top for a CV
CASE_POSTPROCESSING = "evaluation/case_postprocessing.json"
FOLD = "fold.json"
CASES = "evaluation/cases.tsv"  # a cross-validation's pooled cases
# per-case scores as a long table: case_id, structure, metric, value (a CV: fold first)
SCORES = "evaluation/scores.tsv"
ENSEMBLE = "ensemble.json"  # a cross-validation's fold models and postprocessing
