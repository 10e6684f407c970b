"""Initialising a variant sub-block from the parent's (the starting point of BLD).

- GQA with fewer KV heads: each new K/V head is the mean of the parent K/V heads its
  query heads used (``mean_kv``), or the first of them (``first_kv``).
- Reduced FFN: keep the intermediate channels that matter most. ``activations``:
  importance = mean ``|act(gate(x)) * up(x)|`` over calibration tokens ``x`` (the
  residual stream passed through the parent's post-attention norm), falling back to
  ``weight_norm`` (``|gate_i| * |up_i| * |down_i|``) without calibration.
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
    for name in ("k_proj", "v_proj"):
        _merge_kv_heads(getattr(parent, name), getattr(module, name), config, methods.attention)
    return AttentionSublayer(norm, module)


def _merge_kv_heads(parent: nn.Linear, child: nn.Linear, config, method: str) -> None:
    """Each child KV head from the parent KV heads that its query heads attended with."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    parent_kv = parent.out_features // head_dim
    child_kv = child.out_features // head_dim
    parent_group, child_group = heads // parent_kv, heads // child_kv
    for tensor_name in ("weight", "bias"):
        source = getattr(parent, tensor_name)
        if source is None:
            continue
        source = source.reshape(parent_kv, head_dim, *source.shape[1:])
        merged = []
        for head in range(child_kv):
            used = [q // parent_group for q in range(head * child_group, (head + 1) * child_group)]
            merged.append(source[used[0]] if method == "first_kv" else source[used].mean(0))
        getattr(child, tensor_name).copy_(torch.stack(merged).reshape(getattr(child, tensor_name).shape))


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
    if method == "activations" and calibration is not None:
        x = norm(_tokens(calibration.inputs, mlp.gate_proj.weight))
        total = torch.zeros(mlp.gate_proj.out_features, dtype=torch.float32, device=x.device)
        for chunk in x.split(1024):
            total += (mlp.act_fn(mlp.gate_proj(chunk)) * mlp.up_proj(chunk)).abs().float().sum(0)
        return total / x.shape[0]
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
