"""Per-example statistics of a model's layers from forward/backward hooks, without per-example passes.

For a layer with input z and output gradient o' (one row per token), the per-example weight gradient of
``nn.Linear`` is g_n = sum_s o'_{n,s} z_{n,s}^T, of an embedding it is a scatter of o' into the rows of the
example's tokens, and of a (RMS) layer norm it is sum_s o'_{n,s} * zhat_{n,s}. From these the hooks accumulate

- ``"sq_grad"``: sum_n g_n^2 for every parameter (the diagonal empirical/sampled Fisher);
- ``"gram"``: A = sum_{n,s} z z^T over unmasked tokens, per linear layer (RegMean; forward only);
- ``"kfac"``: A as above and B = sum_{n,s} o' o'^T, per linear layer (K-FAC), with the input rows counted.

Parameters never need ``.grad``: the model's parameters are frozen during the pass and gradients flow only
through activations, so the backward pass does no weight-gradient products of its own. A parameter used by
several module calls in one forward (tied embeddings) gets its per-example gradients summed before squaring.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import Tensor, nn

try:  # GPT-2's transposed linear layer (weight in x out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    Conv1D = ()

MODES = ("sq_grad", "gram", "kfac")


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") or type(module).__name__ == "T5LayerNorm"


#: embeddings whose input is not batch-first (T5's relative position buckets, shape q x k): the per-example
#: loop covers them instead
NOT_PER_EXAMPLE = ("relative_attention_bias",)


def supported_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose parameters the hooks handle, by qualified name."""
    kinds = (nn.Linear, nn.Embedding, nn.LayerNorm) + ((Conv1D,) if Conv1D else ())
    return {
        n: m for n, m in model.named_modules()
        if (isinstance(m, kinds) or _is_rms_norm(m)) and not n.endswith(NOT_PER_EXAMPLE)
    }


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied embeddings and LM heads)."""
    seen: dict[int, int] = defaultdict(int)
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] += 1
    return {i for i, c in seen.items() if c > 1}


def linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Linear layers as name -> (module, axis of the weight that meets the input): 1 for Linear, 0 for Conv1D."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m, 1)
        elif Conv1D and isinstance(m, Conv1D):
            out[name] = (m, 0)
    return out


#: on a CPU, per-example gradients are formed in blocks of weight rows of about this size, so that a block and
#: its running square sum stay in the L2 cache while every example of the batch adds to it
CPU_BLOCK_BYTES = 2 << 20


def square_sum_into(
    acc: Tensor, pieces: list[tuple], n: int, chunk: int | None = None, block_rows: int | None = None
) -> None:
    """acc += sum_n g_n * g_n, with g_n = sum_mm left_n @ right_n + sum_rows (rows of example n added at their ids).

    ``("mm", left N x R x T, right N x T x C)`` is a linear layer's factored per-example gradient;
    ``("rows", keys, values)`` an embedding's, ``keys = n * R + token id`` sorted, ``values`` the rows (K x C).
    On a CPU one example at a time and a block of rows at a time (cache-resident, the cost of an ordinary weight
    gradient); on a GPU 16 examples and all rows at once (``chunk`` and ``block_rows`` override). Never more than
    one chunk's gradients exist at once.
    """
    rows, cols = acc.shape
    cpu = acc.device.type == "cpu"
    chunk = min(chunk or (1 if cpu else 16), n)
    block = block_rows or (max(1, CPU_BLOCK_BYTES // (cols * acc.element_size())) if cpu else rows)
    block = min(block, rows)
    starts = list(range(0, rows, block))
    bounds = []
    for kind, keys, _ in pieces:  # where each (example, row block) begins and ends in the sorted keys, found once
        if kind == "rows":
            q = torch.tensor([e * rows + r for e in range(n) for r in [*starts, rows]], device=keys.device)
            bounds.append(torch.searchsorted(keys, q).reshape(n, -1).tolist())
        else:
            bounds.append(None)
    buf = torch.empty(chunk * block * cols, dtype=acc.dtype, device=acc.device)
    for b, r0 in enumerate(starts):
        r1 = min(rows, r0 + block)
        out = acc[r0:r1]
        for k in range(0, n, chunk):
            c = min(chunk, n - k)
            pe = buf[: c * (r1 - r0) * cols].view(c, r1 - r0, cols)
            first = True
            for (kind, left, right), bnd in zip(pieces, bounds):
                if kind == "mm":
                    if first:
                        torch.bmm(left[k : k + c, r0:r1], right[k : k + c], out=pe)
                    else:
                        pe.baddbmm_(left[k : k + c, r0:r1], right[k : k + c])
                    first = False
                    continue
                if first:
                    pe.zero_()
                    first = False
                for e in range(k, k + c):
                    s0, s1 = bnd[e][b], bnd[e][b + 1]
                    if s1 > s0:
                        pe[e - k].index_add_(0, left[s0:s1] - (e * rows + r0), right[s0:s1])
            if c == 1:
                out.addcmul_(pe[0], pe[0])
            else:  # squared in place: no second buffer
                out += pe.square_().sum(0)


class LayerHooks:
    """Context manager that accumulates per-example statistics (see module docstring) over many batches.

    Set ``token_mask`` (N x S, 1 = real token) before each forward so that Grams skip padding; backward
    statistics need no mask because padded positions receive zero gradient.
    """

    def __init__(self, model: nn.Module, mode: str, dtype: torch.dtype = torch.float32):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.mode, self.dtype = model, mode, dtype
        self.token_mask: Tensor | None = None
        self.sq_grad: dict[str, Tensor] = {}
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}  # input rows seen per layer (K-FAC normalises A by them)
        self._handles: list = []
        self._param_names = {id(p): n for n, p in model.named_parameters()}  # canonical (first) names
        self.batch_size: int | None = None
        self.active = True  # False: the hooks record nothing for the next batches
        self._last_gram: tuple | None = None  # (input, mask, input version, z^T z, rows) of the last layer input
        self._uses: dict[int, int] = defaultdict(int)  # parameter id -> module calls in this forward
        self._pending: dict[int, Tensor] = {}  # per-example gradients of shared parameters, summed over calls
        self._pieces: dict[int, list] = defaultdict(list)  # factored per-example gradients of shared weights
        if mode == "sq_grad":
            self.modules = supported_modules(model)
        else:  # a linear layer whose weight is tied to another use (an LM head) gets no factors: skip it (its
            # output-gradient factor would be vocabulary x vocabulary)
            tied = tied_parameter_ids(model)
            self.modules = {n: m for n, (m, _) in linear_layers(model).items() if id(m.weight) not in tied}
        self.covered = {
            self._param_names[id(p)] for m in self.modules.values() for p in m.parameters(recurse=False)
        }

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> LayerHooks:
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        if self.mode != "gram":
            for p in self.model.parameters():
                p.requires_grad_(False)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad[n])

    def begin_batch(self, batch_size: int, token_mask: Tensor | None = None) -> None:
        """Call before each forward pass."""
        self.batch_size = batch_size
        self.token_mask = token_mask
        self._uses.clear()
        self._pending.clear()
        self._pieces.clear()
        self._last_gram = None

    def end_batch(self) -> None:
        """Call after each backward pass: squares the summed per-example gradients of shared parameters."""
        for pid in list(self._pieces):
            self._flush(pid)
        for pid, g in self._pending.items():
            self._add(self.sq_grad, self._param_names[pid], (g * g).sum(0))
        self._pending.clear()

    # -- accumulation ------------------------------------------------------------------------------------
    @staticmethod
    def _add(store: dict[str, Tensor], key: str, value: Tensor) -> None:
        if key in store:
            store[key] += value
        else:
            store[key] = value.clone()

    def _per_example(self, param: nn.Parameter, g: Tensor) -> None:
        """Record per-example gradients g (N x param.shape) of ``param``."""
        pid = id(param)
        if self._uses[pid] == 1:
            self._add(self.sq_grad, self._param_names[pid], (g * g).sum(0))
        elif pid in self._pending:
            self._pending[pid] += g
        else:
            self._pending[pid] = g.clone()

    def _masked_rows(self, z: Tensor) -> Tensor:
        """Flatten z to token rows, dropping padding when a mask of matching shape is set."""
        rows = z.reshape(-1, z.shape[-1])
        if self.token_mask is not None and z.ndim == 3 and tuple(self.token_mask.shape) == tuple(z.shape[:2]):
            rows = rows[self.token_mask.reshape(-1).to(torch.bool)]
        return rows

    # -- hooks -------------------------------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            if not isinstance(output, Tensor) or not self.active:
                return None
            x = args[0].detach() if args else None
            for p in module.parameters(recurse=False):
                self._uses[id(p)] += 1
            if self.mode in ("gram", "kfac"):
                gram, n_rows = self._input_gram(args[0])
                self._add(self.A, name, gram)
            if self.mode == "gram":
                return None
            if self.mode == "kfac":
                self.tokens[name] = self.tokens.get(name, 0) + n_rows
                fn = lambda g: self._add(self.B, name, (r := g.reshape(-1, g.shape[-1]).to(self.dtype)).T @ r)  # noqa: E731
            else:
                saved = self._saved_input(module, x)
                fn = lambda g: self._backward(module, saved, g)  # noqa: E731
            replaced = None
            if not output.requires_grad:  # first layer of a frozen model: start the activation graph here
                replaced = output = output.detach().requires_grad_(True)
            n = self.batch_size
            if isinstance(module, nn.Embedding) and n and output.shape[0] == 1 and n > 1:
                # shared across the batch (BERT's position ids): expand so that gradients stay per example
                saved = saved.expand(n, *saved.shape[1:])
                replaced = output = output.expand(n, *output.shape[1:])
            output.register_hook(fn)
            return replaced

        return hook

    def _input_gram(self, x: Tensor) -> tuple[Tensor, int]:
        """(sum over token rows of z z^T, rows) of a layer input; layers fed the same tensor in one forward (the
        query, key and value projections; gate and up) share one product instead of computing it each."""
        cached = self._last_gram
        if (cached is not None and cached[0] is x and cached[1] is self.token_mask and not x.is_inference()
                and cached[2] == x._version):
            return cached[3], cached[4]
        rows = self._masked_rows(x.detach().to(self.dtype))
        product = rows.T @ rows
        if not x.is_inference():  # an inference tensor has no version counter: never cached
            self._last_gram = (x, self.token_mask, x._version, product, rows.shape[0])
        return product, rows.shape[0]

    def _saved_input(self, module: nn.Module, x: Tensor) -> Tensor:
        if isinstance(module, nn.LayerNorm):
            return nn.functional.layer_norm(x.float(), module.normalized_shape, None, None, module.eps).to(self.dtype)
        if _is_rms_norm(module):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            xf = x.float()
            if eps is None:  # torch.nn.RMSNorm's default
                eps = torch.finfo(x.dtype).eps
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(self.dtype)
        return x

    def _backward(self, module: nn.Module, x: Tensor, g: Tensor) -> None:
        g = g.to(self.dtype)
        n = g.shape[0]
        if n != self.batch_size:
            raise RuntimeError(
                f"{type(module).__name__} saw a leading dimension {n}, not the batch size {self.batch_size}: "
                "per-example gradients need the batch on the first axis of every layer"
            )
        if isinstance(module, nn.Embedding):
            self._embedding(module, x, g)
            return
        if isinstance(module, (nn.LayerNorm,)) or _is_rms_norm(module):
            gs = g.reshape(n, -1, g.shape[-1])
            xs = x.reshape(n, -1, x.shape[-1])
            if module.weight is not None:
                self._per_example(module.weight, (gs * xs).sum(1))
            if getattr(module, "bias", None) is not None:
                self._per_example(module.bias, gs.sum(1))
            return
        # Linear (weight out x in: g_n = o'_n^T z_n) or Conv1D (weight in x out: g_n = z_n^T o'_n)
        gs = g.reshape(n, -1, g.shape[-1])
        xs = x.to(self.dtype).reshape(n, -1, x.shape[-1])
        left, right = (gs, xs) if isinstance(module, nn.Linear) else (xs, gs)
        self._collect(module.weight, ("mm", left.transpose(1, 2), right))
        if module.bias is not None:
            self._per_example(module.bias, gs.sum(1))

    def _embedding(self, module: nn.Embedding, idx: Tensor, g: Tensor) -> None:
        n, vocab = g.shape[0], module.num_embeddings
        idx = idx.reshape(n, -1)
        rows = g.reshape(n, -1, g.shape[-1])
        keep = torch.ones_like(idx, dtype=torch.bool)
        if module.padding_idx is not None:
            keep = idx != module.padding_idx
        example = torch.arange(n, device=idx.device)[:, None].expand_as(idx)
        if self._uses[id(module.weight)] > 1:  # shared weight (tied LM head): rows added per example when squaring
            key = (example * vocab + idx)[keep]
            order = torch.argsort(key)
            self._collect(module.weight, ("rows", key[order], rows[keep][order].to(self.dtype)))
            return
        # per (example, token id) sums, squared, then scattered to token ids: never N x V x D
        key = (example * vocab + idx)[keep]
        uniq, inverse = torch.unique(key, return_inverse=True)
        sums = torch.zeros(uniq.shape[0], rows.shape[-1], dtype=self.dtype, device=g.device)
        sums.index_add_(0, inverse, rows[keep])
        out = torch.zeros(vocab, rows.shape[-1], dtype=self.dtype, device=g.device)
        out.index_add_(0, uniq % vocab, sums * sums)
        self._add(self.sq_grad, self._param_names[id(module.weight)], out)

    def _collect(self, weight: nn.Parameter, piece: tuple) -> None:
        """Keep one call's factored per-example gradient of ``weight``; square once every call has reported."""
        pid = id(weight)
        self._pieces[pid].append(piece)
        if len(self._pieces[pid]) == self._uses[pid]:
            self._flush(pid)

    def _flush(self, pid: int) -> None:
        """sum_n g_n^2 for g_n = sum over calls of left_n @ right_n plus embedding rows scattered to token ids."""
        pieces = self._pieces.pop(pid)
        name = self._param_names[pid]
        ref = pieces[0][1]
        rows, cols = self.model.get_parameter(name).shape
        acc = self.sq_grad.get(name)
        if acc is None:
            acc = self.sq_grad[name] = torch.zeros(rows, cols, dtype=self.dtype, device=ref.device)
        square_sum_into(acc, pieces, self.batch_size)

    def parameters_not_covered(self) -> Iterator[str]:
        """Trainable parameters owned by modules the hooks do not handle."""
        for n, p in self.model.named_parameters():
            if self._requires_grad.get(n, p.requires_grad) and n not in self.covered:
                yield n
