"""Initialising a variant sub-block from the parent's (the starting point of BLD).

Each function fills a child sub-block that the family built (with its own modules:
biases, norms) from the parent's, through the usual decoder names (``q_proj``...
``o_proj``, ``gate_proj``/``up_proj``/``down_proj``, ``act_fn``); biases are carried
along wherever the modules have them.

- GQA with fewer KV heads: each new K/V head is the mean of the parent K/V heads its
  query heads used, in consecutive groups (``mean_kv``), or the first of them
  (``first_kv``). ``similar_kv`` groups the parent KV heads whose keys and values on
  calibration tokens are most alike (linear CKA) instead of neighbours, moves the query
  heads along with them, and takes the mean. ``fitted_kv`` groups the same way, then fits
  each new head to its group's outputs instead of averaging weights: keys per rotary
  frequency by a complex rank-1 fit whose per-head factors are folded into the query
  heads (rotary embeddings commute with them), values by a rank-``head_dim`` regression of
  the group's value-times-output maps whose per-head factors become the new ``o_proj``.
  Both need calibration and fall back to ``mean_kv`` without it.
- Reduced FFN: keep the intermediate channels that matter most. ``activations``:
  importance = mean ``|act(gate(x)) * up(x)|`` over calibration tokens ``x`` (the
  residual stream passed through the parent's post-attention norm); ``contribution``
  (the Puzzle paper's channel contribution): that times the norm of the channel's
  down-projection column, i.e. how much the channel adds to the FFN's output; ``fitted``:
  the channels of ``contribution``, then the down projection re-fitted (ridge towards
  the kept columns) so they reproduce the parent FFN's output on the calibration tokens.
  All fall back to ``weight_norm`` (``|gate_i| * |up_i| * |down_i|``) without calibration.
- Linear replacements: ``lstsq``, a ridge-regularised least-squares fit of the parent
  sub-block's map (normed input -> delta) on calibration tokens, zeros without them;
  or ``zeros``.

The methods per part are an :class:`~puzzle_core.decoder.variants.InitMethods` (defaults: ``fitted_kv``,
``fitted``, ``lstsq``, the best measured on SmolLM2; see ``benchmarks/README.md``).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from puzzle_core.blocks import AttentionSpec, FFNSpec, SubBlockSpec
from puzzle_core.decoder.checkpoint import differences
from puzzle_core.decoder.runner import AttentionSublayer, FFNSublayer
from puzzle_core.decoder.variants import InitMethods
from puzzle_core.errors import UserError
from puzzle_core.interfaces import Calibration


def _check_same_tensors(parent: nn.Module, child: nn.Module, what: str) -> None:
    """A variant keeps the parent's tensors (biases included), only fewer heads or channels: the same names."""
    found = differences(child.state_dict(), parent.state_dict(), "the parent's", shapes=False)
    if found:
        raise ValueError(f"the child's {what} {found}; the child code must build the parent's modules (biases, norms)")


def _copy_norm(parent: nn.Module, child: nn.Module) -> None:
    _check_same_tensors(parent, child, "norm")
    child.load_state_dict(parent.state_dict())


@torch.no_grad()
def init_attention(parent: AttentionSublayer, child: AttentionSublayer, calibration: Calibration | None,
                   methods: InitMethods) -> None:
    """Fill ``child`` (GQA or linear, built by the family) from the parent's attention sub-block."""
    _copy_norm(parent.input_layernorm, child.input_layernorm)
    norm, module, source = child.input_layernorm, child.self_attn, parent.self_attn
    if hasattr(module, "linear_attn"):
        fit_linear(module.linear_attn, norm, calibration, methods)
        return
    _check_same_tensors(source, module, "attention")
    module.q_proj.load_state_dict(source.q_proj.state_dict())
    module.o_proj.load_state_dict(source.o_proj.state_dict())
    head_dim = module.head_dim
    layout = KVHeadLayout(module.q_proj.out_features // head_dim, head_dim, source.k_proj.out_features // head_dim,
                          module.k_proj.out_features // head_dim)
    calibrated = methods.attention in ("similar_kv", "fitted_kv") and calibration is not None and layout.regroupable
    if not calibrated:
        for name in ("k_proj", "v_proj"):
            merge_kv_heads(getattr(source, name), getattr(module, name), layout, methods.attention)
        return
    x = _augmented(norm(_tokens(calibration.inputs, norm.weight)).double(), source.k_proj.bias is not None)
    gram = x.T @ x / x.shape[0]
    gram += methods.ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    whiten = torch.linalg.cholesky(gram).T  # upper R with R^T R = gram: ||x a||^2 / n = ||R a||^2
    weights = {name: _augmented_weight(getattr(source, name)).reshape(-1, layout.head_dim, x.shape[1])
               for name in ("q_proj", "k_proj", "v_proj")}
    o_weight = source.o_proj.weight.double().reshape(-1, layout.heads, layout.head_dim)  # (hidden, heads, head_dim)
    groups = _similar_groups(x, weights["k_proj"], weights["v_proj"], layout)
    order = [q for group in groups for k in group for q in layout.queries(k)]  # query heads follow their KV head
    q, o = weights["q_proj"][order].clone(), o_weight[:, order].clone()
    keys, values = [], []
    for j, group in enumerate(groups):
        rows = slice(j * layout.child_group, (j + 1) * layout.child_group)  # this KV head's query heads, new order
        if methods.attention == "similar_kv":
            keys.append(weights["k_proj"][group].mean(0))
            values.append(weights["v_proj"][group].mean(0))
            continue
        keys.append(_fit_keys(x, whiten, weights["k_proj"][group], q[rows], layout))
        value, o[:, rows] = _fit_values(x, whiten, weights["v_proj"][group], o[:, rows], layout)
        values.append(value)
    _load_augmented(module.q_proj, q)
    _load_augmented(module.k_proj, torch.stack(keys))
    _load_augmented(module.v_proj, torch.stack(values))
    module.o_proj.weight.copy_(o.reshape(o.shape[0], -1).to(module.o_proj.weight.dtype))


@attrs.frozen
class KVHeadLayout:
    """Query heads, head size, parent and child KV heads of a GQA attention being merged."""

    heads: int
    head_dim: int
    parent_kv: int
    child_kv: int

    @property
    def parent_group(self) -> int:  # query heads per parent KV head
        return self.heads // self.parent_kv

    @property
    def child_group(self) -> int:  # query heads per child KV head
        return self.heads // self.child_kv

    @property
    def regroupable(self) -> bool:
        """Whether every child KV head can take whole parent KV heads (with all their query heads)."""
        return self.parent_kv % self.child_kv == 0

    def queries(self, kv_head: int) -> range:
        return range(kv_head * self.parent_group, (kv_head + 1) * self.parent_group)


@torch.no_grad()
def merge_kv_heads(parent: nn.Linear, child: nn.Linear, layout: KVHeadLayout, method: str = "mean_kv") -> None:
    """Each child K (or V) head from the parent heads its query heads attended with, in consecutive groups:
    their mean (``mean_kv``) or the first (``first_kv``); weight and bias alike."""
    for tensor_name in ("weight", "bias"):
        source = getattr(parent, tensor_name)
        if source is None:
            continue
        source = source.reshape(layout.parent_kv, layout.head_dim, *source.shape[1:])
        merged = []
        for head in range(layout.child_kv):
            queries = range(head * layout.child_group, (head + 1) * layout.child_group)
            used = [q // layout.parent_group for q in queries]
            merged.append(source[used[0]] if method == "first_kv" else source[used].mean(0))
        getattr(child, tensor_name).copy_(torch.stack(merged).reshape(getattr(child, tensor_name).shape))


def _augmented(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Inputs with a column of ones when the projections have biases (a bias is then one more weight column)."""
    return torch.cat([x, torch.ones_like(x[:, :1])], 1) if bias else x


def _augmented_weight(linear: nn.Linear) -> torch.Tensor:
    weight = linear.weight.double()
    return torch.cat([weight, linear.bias.double()[:, None]], 1) if linear.bias is not None else weight


def _load_augmented(linear: nn.Linear, weight: torch.Tensor) -> None:
    """Copy ``(heads, head_dim, inputs[+1])`` weights back into a linear layer (the last column is its bias)."""
    weight = weight.reshape(linear.out_features, -1)
    linear.weight.copy_(weight[:, : linear.in_features].to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(weight[:, -1].to(linear.bias.dtype))


def _linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of two token x feature matrices: 1 when one is a rotation and scaling of the other."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()).clamp_min(1e-30))


def _similar_groups(x, k_weight, v_weight, layout: KVHeadLayout) -> list[list[int]]:
    """Parent KV heads in ``child_kv`` groups of alike heads: each group grows from its lowest free head by
    adding the free head most similar (mean CKA of keys and values on ``x``) to those already in it."""
    size = layout.parent_kv // layout.child_kv
    outputs = [torch.cat([x @ k_weight[k].T, x @ v_weight[k].T], 1) for k in range(layout.parent_kv)]
    similarity = [[_linear_cka(a, b) for b in outputs] for a in outputs]
    free, groups = list(range(layout.parent_kv)), []
    while free:
        group = [free.pop(0)]
        while len(group) < size:
            best = max(free, key=lambda k: (sum(similarity[k][g] for g in group), -k))
            free.remove(best)
            group.append(best)
        groups.append(sorted(group))
    return groups


def _fit_keys(x, whiten, keys, queries, layout: KVHeadLayout) -> torch.Tensor:
    """One key head for a group of parent key heads ``(g, head_dim, inputs)``; folds factors into ``queries``.

    Per rotary frequency ``f`` a key is the complex number ``k[f] + i k[f + head_dim/2]`` and
    the score ``Re(conj(q) k)``; a complex factor on a key head can move into its query
    heads (``q * conj(c)``) without changing any score, whatever the rotation. So each
    frequency's parent key heads are fitted as ``c_h * shared`` (rank 1 in the metric of
    the calibration inputs, each head weighted by the energy its query heads put on that
    frequency), and ``queries`` (``(g * parent_group, head_dim, inputs)``, modified in
    place) absorb the ``c_h``.
    """
    half = layout.head_dim // 2
    heads = keys.shape[0]
    shared = torch.empty_like(keys[0])
    inverse = torch.linalg.inv(whiten)
    for f in range(half):
        k = torch.complex(keys[:, f], keys[:, f + half])  # (g, inputs)
        q = torch.complex(queries[:, f], queries[:, f + half])  # (g * parent_group, inputs)
        energy = ((x @ queries[:, f].T) ** 2 + (x @ queries[:, f + half].T) ** 2).mean(0)  # per query head
        weight = energy.reshape(heads, layout.parent_group).mean(1).clamp_min(1e-12).sqrt()  # per parent head
        target = whiten.to(k.dtype) @ (k * weight[:, None]).T  # (inputs, g)
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        factors = vh[0] / weight  # parent head h ~= factors[h] * shared
        scale = factors.abs().pow(2).mean().sqrt()
        key = inverse.to(k.dtype) @ u[:, 0] * s[0] * scale
        factors = factors / scale
        shared[f], shared[f + half] = key.real, key.imag
        folded = q * factors.conj().repeat_interleave(layout.parent_group)[:, None]
        queries[:, f], queries[:, f + half] = folded.real, folded.imag
    return shared


def _fit_values(x, whiten, values, outputs, layout: KVHeadLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One value head for parent value heads ``(g, head_dim, inputs)`` and their query heads' ``o_proj`` columns
    ``(hidden, g * parent_group, head_dim)``: the best rank-``head_dim`` fit (in the metric of the inputs) of
    the maps ``input -> value_h -> o_proj`` of every query head; returns the value head and the new columns."""
    hidden, queries, head_dim = outputs.shape
    maps = torch.cat([values[q // layout.parent_group].T @ outputs[:, q].T for q in range(queries)], 1)
    u, s, vh = torch.linalg.svd(whiten @ maps, full_matrices=False)
    scale = torch.stack([(x @ v.T).pow(2).mean() for v in values]).mean().sqrt()  # keep the parents' value size
    value = (torch.linalg.solve(whiten, u[:, :head_dim]) * scale).T  # (head_dim, inputs)
    columns = (s[:head_dim, None] * vh[:head_dim] / scale).reshape(head_dim, queries, hidden).permute(2, 1, 0)
    return value, columns


@torch.no_grad()
def init_ffn(parent: FFNSublayer, child: FFNSublayer, calibration: Calibration | None, methods: InitMethods) -> None:
    """Fill ``child`` (a narrower gated MLP or a linear map, built by the family) from the parent's FFN sub-block."""
    _copy_norm(parent.post_attention_layernorm, child.post_attention_layernorm)
    norm, module, source = child.post_attention_layernorm, child.mlp, parent.mlp
    if hasattr(module, "linear_mlp"):
        fit_linear(module.linear_mlp, norm, calibration, methods)
        return
    _check_same_tensors(source, module, "FFN")
    keep = important_channels(source, norm, module.gate_proj.out_features, calibration, methods.ffn)
    keep_channels(source, module, keep)
    if methods.ffn == "fitted" and calibration is not None:
        fit_down_projection(module, norm, calibration)


@torch.no_grad()
def keep_channels(parent: nn.Module, child: nn.Module, keep: torch.Tensor) -> None:
    """Copy the intermediate channels ``keep`` of a gated MLP (``gate_proj``/``up_proj`` rows, ``down_proj`` columns)."""
    for name in ("gate_proj", "up_proj"):
        getattr(child, name).weight.copy_(getattr(parent, name).weight[keep])
        if getattr(parent, name).bias is not None:
            getattr(child, name).bias.copy_(getattr(parent, name).bias[keep])
    child.down_proj.weight.copy_(parent.down_proj.weight[:, keep])
    if parent.down_proj.bias is not None:
        child.down_proj.bias.copy_(parent.down_proj.bias)


@torch.no_grad()
def fit_down_projection(mlp: nn.Module, norm: nn.Module, calibration: Calibration) -> None:
    """``down_proj`` re-fitted so the kept channels reproduce the parent FFN's output on calibration tokens.

    Ridge regression pulled towards the kept columns (``min ||A W^T - Y||^2 + lam ||W - W0||^2``,
    ``lam`` = mean diagonal of ``A^T A`` times 4 x channels / tokens: on SmolLM2 layers that
    improved held-out error over the kept columns alone for 384-768 channels from 1k to 16k
    tokens), so few calibration tokens cannot overfit it and the full width gives back
    the parent exactly.
    """
    x = norm(_tokens(calibration.inputs, mlp.gate_proj.weight))
    acts = torch.cat([mlp.act_fn(mlp.gate_proj(chunk)) * mlp.up_proj(chunk) for chunk in x.split(1024)]).double()
    target = _tokens(calibration.outputs, mlp.down_proj.weight).double()
    if mlp.down_proj.bias is not None:
        target = target - mlp.down_proj.bias.double()
    gram = acts.T @ acts
    lam = gram.diagonal().mean().clamp_min(1e-12) * 4 * acts.shape[1] / acts.shape[0]
    prior = mlp.down_proj.weight.double().T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    fitted = torch.linalg.solve(gram + lam * eye, acts.T @ target + lam * prior)
    mlp.down_proj.weight.copy_(fitted.T.to(mlp.down_proj.weight.dtype))


@torch.no_grad()
def channel_importance(mlp: nn.Module, norm: nn.Module, calibration: Calibration | None, method: str) -> torch.Tensor:
    """Per intermediate channel: how much it contributes (see the module docstring)."""
    if method in ("activations", "contribution", "fitted") and calibration is not None:
        x = norm(_tokens(calibration.inputs, mlp.gate_proj.weight))
        total = torch.zeros(mlp.gate_proj.out_features, dtype=torch.float32, device=x.device)
        for chunk in x.split(1024):
            total += (mlp.act_fn(mlp.gate_proj(chunk)) * mlp.up_proj(chunk)).abs().float().sum(0)
        activation = total / x.shape[0]
        if method == "activations":
            return activation
        return activation * mlp.down_proj.weight.float().norm(dim=0)
    return (
        mlp.gate_proj.weight.float().norm(dim=1)
        * mlp.up_proj.weight.float().norm(dim=1)
        * mlp.down_proj.weight.float().norm(dim=0)
    )


def important_channels(mlp: nn.Module, norm: nn.Module, size: int, calibration: Calibration | None,
                       method: str) -> torch.Tensor:
    """The ``size`` most important channels of a gated MLP, in order (see :func:`channel_importance`)."""
    if size > mlp.gate_proj.out_features:
        raise UserError(
            f"An FFN of {size} channels cannot be initialised from a parent FFN of {mlp.gate_proj.out_features}."
        )
    importance = channel_importance(mlp, norm, calibration, method)
    return importance.topk(size).indices.sort().values


def _tokens(tensor, like: torch.Tensor) -> torch.Tensor:
    """Calibration activations as ``(tokens, hidden)`` in the dtype and device of ``like``."""
    tensor = torch.as_tensor(tensor)
    return tensor.reshape(-1, tensor.shape[-1]).to(dtype=like.dtype, device=like.device)


@torch.no_grad()
def fit_linear(linear: nn.Linear, norm: nn.Module, calibration: Calibration | None, methods: InitMethods) -> None:
    """``linear.weight`` = ridge least-squares map from normed inputs to the parent's deltas."""
    if methods.linear == "zeros" or calibration is None:
        linear.weight.zero_()
        return
    x = norm(_tokens(calibration.inputs, linear.weight)).double()
    y = _tokens(calibration.outputs, linear.weight).double()
    gram = x.T @ x
    ridge = methods.ridge * gram.diagonal().mean().clamp_min(1e-12)
    solution = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), x.T @ y)
    linear.weight.copy_(solution.T.to(linear.weight.dtype))


def init_sublayer(parent: nn.Module, child: nn.Module, spec: SubBlockSpec, calibration: Calibration | None,
                  methods: InitMethods) -> nn.Module:
    """Fill ``child`` (the sub-block of ``spec``, built by the family) from the parent's, and return it.

    ``parent`` / ``child`` are :class:`AttentionSublayer` or :class:`FFNSublayer`; a no-op has nothing to fill.
    """
    if spec.no_op:
        return child
    if isinstance(spec, AttentionSpec):
        init_attention(parent, child, calibration, methods)
    elif isinstance(spec, FFNSpec):
        init_ffn(parent, child, calibration, methods)
    else:
        raise TypeError(f"expected an AttentionSpec or FFNSpec, got {spec!r}")
    return child
