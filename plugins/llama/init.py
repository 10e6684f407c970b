"""Initialising a variant sub-block from the parent's (the starting point of BLD).

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
  down-projection column, i.e. how much the channel adds to the FFN's output. Both fall
  back to ``weight_norm`` (``|gate_i| * |up_i| * |down_i|``) without calibration.
- Linear replacements: ``lstsq``, a ridge-regularised least-squares fit of the parent
  sub-block's map (normed input -> delta) on calibration tokens, zeros without them;
  or ``zeros``.

An init method string names these per part, e.g. ``attention=mean_kv,ffn=activations,linear=lstsq``
(``default`` for all defaults).
"""

from __future__ import annotations

import copy

import attrs
import torch
from torch import nn

from puzzle_core.api import AttentionSpec, Calibration, FFNSpec, SubBlockSpec, UserError
from puzzle_plugins.llama.modeling_decilm import make_attention, make_mlp
from puzzle_plugins.llama.options import ATTENTION_METHODS, FFN_METHODS, LINEAR_METHODS
from puzzle_plugins.llama.runner import AttentionSublayer, FFNSublayer



@attrs.frozen
class InitMethods:
    """How each kind of variant is initialised from the parent."""

    attention: str = attrs.field(default="mean_kv", validator=attrs.validators.in_(ATTENTION_METHODS))
    ffn: str = attrs.field(default="activations", validator=attrs.validators.in_(FFN_METHODS))
    linear: str = attrs.field(default="lstsq", validator=attrs.validators.in_(LINEAR_METHODS))
    ridge: float = 1e-4  # relative to the mean diagonal of X^T X

    def __str__(self) -> str:
        return f"attention={self.attention},ffn={self.ffn},linear={self.linear}"

    @classmethod
    def parse(cls, text: str) -> "InitMethods":
        if text in ("", "default"):
            return cls()
        fields = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("attention", "ffn", "linear"):
                raise UserError(
                    f"Init method '{text}' is not understood; write e.g. 'attention=mean_kv,ffn=activations,"
                    f"linear=lstsq' (attention: {', '.join(ATTENTION_METHODS)}; ffn: {', '.join(FFN_METHODS)}; "
                    f"linear: {', '.join(LINEAR_METHODS)})."
                )
            fields[key.strip()] = value.strip()
        try:
            return cls(**fields)
        except ValueError as exc:
            raise UserError(f"Init method '{text}': {exc}.") from None


def _copy(module: nn.Module | None) -> nn.Module | None:
    return copy.deepcopy(module) if module is not None else None


@torch.no_grad()
def init_attention(parent_layer: nn.Module, spec: AttentionSpec, config, calibration: Calibration | None,
                   methods: InitMethods) -> AttentionSublayer:
    """An attention sub-block for ``spec`` from the parent layer's attention."""
    if spec.no_op:
        return AttentionSublayer(None, None)
    norm = _copy(parent_layer.input_layernorm)
    block = {"attention": {"n_heads_in_group": spec.n_heads_in_group, "no_op": False,
                           "replace_with_linear": spec.replace_with_linear}}
    module = make_attention(config, block, cache_index=0).to(
        dtype=norm.weight.dtype, device=norm.weight.device
    )
    if spec.replace_with_linear:
        _fit_linear(module.linear_attn, norm, calibration, methods)
        return AttentionSublayer(norm, module)
    parent = parent_layer.self_attn
    module.q_proj.load_state_dict(parent.q_proj.state_dict())
    module.o_proj.load_state_dict(parent.o_proj.state_dict())
    layout = _HeadLayout(config.num_attention_heads, config.head_dim, parent.k_proj.out_features // config.head_dim,
                         module.k_proj.out_features // config.head_dim)
    calibrated = methods.attention in ("similar_kv", "fitted_kv") and calibration is not None and layout.regroupable
    if not calibrated:
        for name in ("k_proj", "v_proj"):
            _merge_kv_heads(getattr(parent, name), getattr(module, name), layout, methods.attention)
        return AttentionSublayer(norm, module)
    x = _augmented(norm(_tokens(calibration.inputs, norm.weight)).double(), parent.k_proj.bias is not None)
    gram = x.T @ x / x.shape[0]
    gram += methods.ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    whiten = torch.linalg.cholesky(gram).T  # upper R with R^T R = gram: ||x a||^2 / n = ||R a||^2
    weights = {name: _augmented_weight(getattr(parent, name)).reshape(-1, layout.head_dim, x.shape[1])
               for name in ("q_proj", "k_proj", "v_proj")}
    o_weight = parent.o_proj.weight.double().reshape(-1, layout.heads, layout.head_dim)  # (hidden, heads, head_dim)
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
    return AttentionSublayer(norm, module)


@attrs.frozen
class _HeadLayout:
    """Query heads, head size, parent and child KV heads of a GQA attention."""

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


def _merge_kv_heads(parent: nn.Linear, child: nn.Linear, layout: _HeadLayout, method: str) -> None:
    """Each child KV head from the parent KV heads that its query heads attended with (consecutive groups)."""
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


def _similar_groups(x, k_weight, v_weight, layout: _HeadLayout) -> list[list[int]]:
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


def _fit_keys(x, whiten, keys, queries, layout: _HeadLayout) -> torch.Tensor:
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


def _fit_values(x, whiten, values, outputs, layout: _HeadLayout) -> tuple[torch.Tensor, torch.Tensor]:
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
def init_ffn(parent_layer: nn.Module, spec: FFNSpec, config, calibration: Calibration | None,
             methods: InitMethods) -> FFNSublayer:
    """An FFN sub-block for ``spec`` from the parent layer's FFN."""
    if spec.no_op:
        return FFNSublayer(None, None)
    norm = _copy(parent_layer.post_attention_layernorm)
    block = {"ffn": {"intermediate_size": spec.intermediate_size, "no_op": False,
                     "replace_with_linear": spec.replace_with_linear}}
    module = make_mlp(config, block).to(dtype=norm.weight.dtype, device=norm.weight.device)
    if spec.replace_with_linear:
        _fit_linear(module.linear_mlp, norm, calibration, methods)
        return FFNSublayer(norm, module)
    parent = parent_layer.mlp
    keep = _important_channels(parent, norm, spec.intermediate_size, calibration, methods.ffn)
    module.gate_proj.weight.copy_(parent.gate_proj.weight[keep])
    module.up_proj.weight.copy_(parent.up_proj.weight[keep])
    module.down_proj.weight.copy_(parent.down_proj.weight[:, keep])
    for name in ("gate_proj", "up_proj"):
        if getattr(parent, name).bias is not None:
            getattr(module, name).bias.copy_(getattr(parent, name).bias[keep])
    if parent.down_proj.bias is not None:
        module.down_proj.bias.copy_(parent.down_proj.bias)
    return FFNSublayer(norm, module)


def channel_importance(mlp: nn.Module, norm: nn.Module, calibration: Calibration | None, method: str) -> torch.Tensor:
    """Per intermediate channel: how much it contributes (see the module docstring)."""
    if method in ("activations", "contribution") and calibration is not None:
        x = norm(_tokens(calibration.inputs, mlp.gate_proj.weight))
        total = torch.zeros(mlp.gate_proj.out_features, dtype=torch.float32, device=x.device)
        for chunk in x.split(1024):
            total += (mlp.act_fn(mlp.gate_proj(chunk)) * mlp.up_proj(chunk)).abs().float().sum(0)
        activation = total / x.shape[0]
        return activation * mlp.down_proj.weight.float().norm(dim=0) if method == "contribution" else activation
    return (
        mlp.gate_proj.weight.float().norm(dim=1)
        * mlp.up_proj.weight.float().norm(dim=1)
        * mlp.down_proj.weight.float().norm(dim=0)
    )


def _important_channels(mlp, norm, size: int, calibration, method: str) -> torch.Tensor:
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


def _fit_linear(linear: nn.Linear, norm: nn.Module, calibration: Calibration | None, methods: InitMethods) -> None:
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


def init_sublayer(parent_layer: nn.Module, spec: SubBlockSpec, config, calibration: Calibration | None,
                  methods: InitMethods) -> nn.Module:
    if isinstance(spec, AttentionSpec):
        return init_attention(parent_layer, spec, config, calibration, methods)
    if isinstance(spec, FFNSpec):
        return init_ffn(parent_layer, spec, config, calibration, methods)
    raise TypeError(f"expected an AttentionSpec or FFNSpec, got {spec!r}")
