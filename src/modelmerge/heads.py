"""Frozen classification heads over one shared encoder (DESIGN.md section 7).

A suite model is ``logits = scale * normalise(features(encoder, x)) @ W^T + b``: the encoder is what fine-tuning
changes and merging merges; each task's head (W, b, scale) is fixed before any fine-tuning and never trained, so any
encoder (pretrained, fine-tuned, merged) can be scored on any task. Heads are buffers, not parameters: optimisers,
Fisher estimators and layer hooks never see them. Text encoders pool by the attention-masked mean of the last hidden
state (MiniLM's own sentence-embedding recipe); CLIP vision encoders use their projected image embedding.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "clip")


class LinearHead(nn.Module):
    """A frozen linear head: logits = scale * f @ W^T + b on unit-norm features f."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, scale: float = 1.0, classes: Sequence[str] = ()):
        super().__init__()
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if weight.ndim != 2:
            raise ValueError(f"head weight must be classes x features, got shape {tuple(weight.shape)}")
        bias = torch.zeros(weight.shape[0]) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"head bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if classes and len(classes) != weight.shape[0]:
            raise ValueError(f"head has {weight.shape[0]} rows but {len(classes)} class names")
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.clone())
        self.scale = float(scale)
        self.classes = list(classes) or [str(i) for i in range(weight.shape[0])]

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        """scale * f @ W^T + b."""
        return self.scale * F.linear(features.to(self.weight.dtype), self.weight) + self.bias

    def save(self, path: str | os.PathLike) -> None:
        """weight, bias and scale as safetensors; class names in the metadata (written atomically)."""
        import json

        from modelmerge.io import save_state_dict

        save_state_dict({"weight": self.weight, "bias": self.bias, "scale": torch.tensor([self.scale])}, path,
                        metadata={"kind": "linear_head", "classes": json.dumps(self.classes)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearHead:
        """The head saved by ``save``."""
        import json

        from safetensors import safe_open

        from modelmerge.files import read_safetensors_header

        read_safetensors_header(path)  # a cut file is named here, not deep inside safetensors
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != "linear_head":
                raise ValueError(f"{path} does not hold a linear head (kind={meta.get('kind')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(t["weight"], t["bias"], float(t["scale"][0]), json.loads(meta["classes"]))


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """sum_s m_s h_s / sum_s m_s: the mean of the unpadded tokens' hidden states."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class EncoderClassifier(nn.Module):
    """An encoder with one frozen head per task; ``task`` selects the head ``forward`` uses."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, LinearHead], pooling: str = "mean", task: str | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not heads:
            raise ValueError("need at least one head")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.pooling = pooling
        self.task = task or next(iter(heads))

    def set_task(self, task: str) -> EncoderClassifier:
        """Score with ``task``'s head from now on."""
        if task not in self.heads:
            raise KeyError(f"no head for task {task!r}; heads: {sorted(self.heads)}")
        self.task = task
        return self

    def features(self, **inputs) -> Tensor:
        """Unit-norm features of a batch (the input of every head)."""
        if self.pooling == "clip":
            out = self.encoder(pixel_values=inputs["pixel_values"])
            f = out.image_embeds if hasattr(out, "image_embeds") else out
        else:
            out = self.encoder(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            f = mean_pool(out.last_hidden_state, inputs.get("attention_mask"))
        return F.normalize(f, dim=-1)

    def forward(self, task: str | None = None, **inputs) -> SequenceClassifierOutput:
        """Logits of ``task``'s head (a batch may name its task), else of the current task's head."""
        task = task or self.task
        if task not in self.heads:
            raise KeyError(f"no head for task {task!r}; heads: {sorted(self.heads)}")
        return SequenceClassifierOutput(logits=self.heads[task](self.features(**inputs)))

    def encoder_state(self) -> dict[str, Tensor]:
        """The encoder's parameters and buffers: what task vectors and merges cover."""
        return {k: v.detach() for k, v in self.encoder.state_dict().items()}

    def load_encoder_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the encoder's weights (strict: every key, no extra)."""
        self.encoder.load_state_dict(dict(state), strict=True)


#: CLIP's logit scale at the end of its training (exp(4.6052)); a text zero-shot head uses it as CLIP's does
CLIP_LOGIT_SCALE = 100.0


@torch.no_grad()
def text_zero_shot_head(encoder: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                        scale: float = CLIP_LOGIT_SCALE, max_length: int = 64, batch_size: int = 64) -> LinearHead:
    """CLIP's zero-shot head built with a text encoder: w_c = normalise(mean_t normalise(meanpool(g(template_t(c))))),
    logits scale * f^T w_c, bias 0 (``templates`` hold ``{}`` where the class name goes)."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    if any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' for the class name, got {list(templates)}")
    texts = [t.format(c) for c in classnames for t in templates]
    device = next(encoder.parameters()).device
    encoder.eval()
    chunks = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        chunks.append(F.normalize(mean_pool(hidden, enc["attention_mask"]).float(), dim=-1).cpu())
    per_template = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return LinearHead(F.normalize(per_template.mean(1), dim=-1), None, scale, list(classnames))


@torch.no_grad()
def encode(model: EncoderClassifier, batches: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Unit-norm features of every example, in batch order."""
    model.eval()
    device = next(model.encoder.parameters()).device
    return torch.cat([model.features(**{k: v.to(device) for k, v in b.items() if k != "labels"}).cpu()
                      for b in batches])


def fit_linear_probe(
    features: Tensor, labels: Sequence[int], num_classes: int, l2: float = 1e-3, max_iter: int = 500,
    classes: Sequence[str] = (),
) -> LinearHead:
    """Multinomial logistic regression on frozen features: argmin_{W,b} mean_n -log softmax(W f_n + b)_{y_n} + l2/2 ||W||^2.

    Solved by L-BFGS in float64 from zero (a strictly convex problem for l2 > 0, so the optimum is unique and
    the head does not depend on any seed).
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(np.array(labels), dtype=torch.long)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"need features N x d and N labels, got {tuple(x.shape)} and {len(y)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearHead(w.detach().float(), b.detach().float(), 1.0, classes)
