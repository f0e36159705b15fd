"""003's DPP selection inside a recipe: which of its models to merge, from their hidden states on the same texts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from modelmerge.recipe.config import RecipeError
from modelmerge.recipe.data import read_texts

if TYPE_CHECKING:
    from modelmerge.recipe.plan import Plan


def hidden_states(folder: Path, texts: list[str], max_length: int, batch_size: int, device: str | None = None) -> Tensor:
    """Mean-pooled last hidden states (texts x features) of a model folder's backbone."""
    import transformers

    from modelmerge.curvature.estimate import default_device
    from modelmerge.files import check_safetensors
    from modelmerge.train import text_batches

    check_safetensors(folder)
    device = torch.device(device) if device else default_device()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModel.from_pretrained(folder).to(device).eval()
    out = []
    with torch.no_grad():
        for b in text_batches(tokenizer, texts, None, batch_size, max_length):
            mask = b["attention_mask"].to(device)
            h = model(input_ids=b["input_ids"].to(device), attention_mask=mask).last_hidden_state
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).float().cpu())
    return torch.cat(out)


def dpp_select(plan: Plan, device: str | None = None) -> tuple[list[int], str]:
    """003's DPP MAP of size k over the plan's models (see ``Select``); returns the indices and a report."""
    from tqdm.auto import tqdm

    from modelmerge.select import dpp_kernel, exact_map, greedy_map, log_det, quality_scores, similarity_matrix

    sel = plan.recipe.select
    texts, _ = read_texts(plan.recipe_root / sel.data, sel.column, None, sel.examples, 0)
    reps = torch.stack([hidden_states(m.folder, texts, sel.max_length, sel.batch_size, device)
                        for m in tqdm(plan.models, desc="hidden states for the DPP")])
    try:
        q = quality_scores(sel.quality, sel.base_quality)
    except ValueError as err:
        raise RecipeError(f"select.quality: {err}") from None
    L = dpp_kernel(q, similarity_matrix(reps))
    chosen = sorted((exact_map if sel.exact else greedy_map)(L, sel.k))
    if len(chosen) < sel.k:
        raise RecipeError(f"select.k: only {len(chosen)} models can be selected with det(L_Y) > 0 (the others are "
                          "duplicates, or no better than the base)")
    names = ", ".join(plan.models[i].label for i in chosen)
    return chosen, f"DPP selected {names} (log det L_Y = {log_det(L, chosen):.3f})"
