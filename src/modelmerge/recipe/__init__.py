"""Merge recipes: a YAML file that names a method, a base model, task models and (where the method needs it)
their curvature. A recipe is validated against the library's own signatures before any weight is read, then
merged parameter by parameter into a Hugging Face model folder (``modelmerge merge``, ``modelmerge.cli``).

    method: gradient_matching        # any key of METHODS
    base: base-model/                # a model folder, a .safetensors file, or a hub name (where reachable)
    models:
      - {model: math-model/, data: math.csv}           # data: estimate this model's curvature on it
      - {model: code-model/, curvature: code.fisher.safetensors}   # or a file from `modelmerge curvature`
    parameters: {alphas: [1.0, 1.0]}  # the method's own keyword arguments, checked against its signature
    curvature: {kind: fisher, scale: sum, base: 1.0e-4, examples: 256, max_length: 128}

The package holds one concern per module: ``config`` (the schema and the checks that need no file), ``mergekit``
(mergekit configurations translated), ``sources`` (reading input models), ``data`` (local data files),
``curvature`` (curvature files and estimation), ``select`` (003's DPP selection), ``plan`` (a recipe resolved and
checked: what the dry run prints) and ``run`` (the merge).
"""

from modelmerge.recipe.config import (
    METHODS,
    CurvatureConfig,
    Dare,
    Estimate,
    Method,
    ModelEntry,
    Recipe,
    RecipeError,
    Select,
    load_recipe,
    method_parameters,
    parameters_model,
    validate_recipe,
    validation_message,
)
from modelmerge.recipe.curvature import (
    HEAD_TASKS,
    ScaledTensors,
    architecture_task,
    check_curvature_file,
    check_curvature_head,
    curvature_file_kind,
    estimate_curvature,
    load_curvature,
    load_for_task,
    needs_fisher_fallback,
)
from modelmerge.recipe.data import check_columns, read_texts
from modelmerge.recipe.plan import Plan, check_output, plan_recipe
from modelmerge.recipe.run import model_card, run_plan
from modelmerge.recipe.select import dpp_select, hidden_states
from modelmerge.recipe.sources import WEIGHT_FILE, ModelSource, ShardedSafetensors, check_compatible, resolve_model

__all__ = [
    "HEAD_TASKS", "METHODS", "WEIGHT_FILE", "CurvatureConfig", "Dare", "Estimate", "Method", "ModelEntry", "ModelSource", "Plan",
    "Recipe", "RecipeError", "ScaledTensors", "Select", "ShardedSafetensors", "architecture_task", "check_columns", "check_compatible",
    "check_curvature_file", "check_curvature_head", "check_output", "curvature_file_kind", "dpp_select", "estimate_curvature",
    "hidden_states", "load_curvature", "load_for_task", "load_recipe", "method_parameters", "model_card",
    "needs_fisher_fallback", "parameters_model", "plan_recipe", "read_texts", "resolve_model", "run_plan",
    "validate_recipe", "validation_message",
]
