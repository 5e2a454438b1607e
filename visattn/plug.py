"""Insert attention blocks into existing residual CNNs, keeping what the model computes.

:func:`plug` finds residual blocks by their structure, not by class name: a module whose forward
adds a convolutional branch to a shortcut of its own input (torchvision ``BasicBlock`` and
``Bottleneck``, timm ResNet / ResNet-D / ResNeXt / SE-ResNet / RegNet / byobnet blocks, pre-act
ResNetV2, and any other block written the same way). Each block's forward is traced once with
``torch.fx`` with every child module kept opaque; the traced graph shows which input of the residual
add is the branch and which is the shortcut, and which module ends the branch.

By default (``gate="zero"``) the block is inserted behind a zero-initialised learnable blend,
``y + gate * (attention(y) - y)``, so right after :func:`plug` the model computes exactly what it
computed before and a pretrained backbone keeps its accuracy. The gate receives a gradient at once;
the attention block's own parameters do from the first step that moves the gate off zero (the
same start as ReZero or DANet's ``gamma``). timm initialises the last norm of each residual branch
to zero for training from scratch (``zero_init_last``); there the gate's gradient is zero too until
that norm's weight has moved, one step later.

``gate="none"`` applies the block as its paper does, ``attention(y)`` with no blend: the wiring the
papers trained from scratch with (SE-ResNet, CBAM, ECA-Net). The gated blend is free to learn any
value, negative included; a negative gate applies the attention inverted, and
:func:`gate_values` reports the learned gates so that a reader can see it.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from .registry import block_info, create_block, list_blocks

__all__ = ["GATES", "Blend", "find_residual_blocks", "gate_values", "plug"]

#: How :func:`plug` wires a block: ``"zero"`` behind a zero-initialised blend (identity at insertion),
#: ``"none"`` applied as the paper does.
GATES = ("zero", "none")

BlockSpec = str | Callable[[int], nn.Module]

_ADD_TARGETS = {operator.add, operator.iadd, torch.add}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def check_gate(gate: object, caller: str = "plug") -> str:
    """``gate`` when it is one of :data:`GATES`, else a ``ValueError`` naming it."""
    if not isinstance(gate, str) or gate not in GATES:
        raise ValueError(f"{caller}: gate must be one of {', '.join(map(repr, GATES))} ('zero': behind a "
                         f"zero-initialised blend, identity at insertion; 'none': the block as its paper "
                         f"applies it), got {gate!r}")
    return gate


class Blend(nn.Module):
    """``y + gate * (block(y) - y)`` with a learnable scalar ``gate`` that starts at zero, or, with
    ``gate="none"``, ``block(y)`` alone.

    Wrapping a block in a zero-gated :class:`Blend` makes it the identity at initialisation; the
    gate learns how much of the block to use. With ``gate="none"`` there is no ``gate`` parameter
    (``self.gate is None``) and the block is applied as its paper does; the block's parameters keep
    the same names (``block.*``) either way.
    """

    def __init__(self, block: nn.Module, *, gate: str = "zero", device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"Blend: block must be a torch.nn.Module, got {type(block).__name__}")
        check_gate(gate, "Blend")
        self.block = block
        if gate == "zero":
            self.gate = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        else:
            self.register_parameter("gate", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.block(x)
        return x + self.gate.to(x.dtype) * (self.block(x) - x)

    def extra_repr(self) -> str:
        return "gate='none'" if self.gate is None else ""


def gate_values(model: nn.Module) -> dict[str, float]:
    """The learned gate of every gated :class:`Blend` in ``model``, by dotted module name (sorted).

    A value near 0 means the block is barely used; a negative one means the network applies the
    block's change inverted (``y - |g| * (block(y) - y)``). Blocks plugged with ``gate="none"`` have
    no gate and are not listed."""
    _check_model(model, "gate_values")
    return {name: float(m.gate.detach().float()) for name, m in sorted(model.named_modules())
            if isinstance(m, Blend) and m.gate is not None}


class Plugged(nn.Module):
    """Run ``module`` and then ``attn`` (a :class:`Blend`) on its output.

    Loading a state dict saved before :func:`plug` still works: the wrapped module's keys
    (``layer1.0.bn3.weight``) are mapped to their new place (``layer1.0.bn3.module.weight``).
    """

    def __init__(self, module: nn.Module, attn: Blend) -> None:
        super().__init__()
        self.module = module
        self.attn = attn
        self._register_load_state_dict_pre_hook(self._remap_unplugged_keys)

    def forward(self, *args, **kwargs):
        return self.attn(self.module(*args, **kwargs))

    def _remap_unplugged_keys(self, state_dict, prefix, *args) -> None:
        own = tuple(f"{prefix}{p}." for p in ("module", "attn"))
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
            state_dict[f"{prefix}module.{key[len(prefix):]}"] = state_dict.pop(key)


# --------------------------------------------------------------------------------------------------
# Finding residual blocks


class _OpaqueTracer(fx.Tracer):
    """Trace one module's own forward, keeping every child module as a single call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return _OpaqueTracer().trace(module)
    except Exception:  # noqa: BLE001  data-dependent control flow, extra required inputs: not a block we can read
        return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _count_convs(nodes: set[fx.Node], owner: nn.Module) -> int:
    count = 0
    for n in nodes:
        if n.op == "call_module":
            sub = owner.get_submodule(n.target)
            count += sum(isinstance(m, _CONV_TYPES) for m in sub.modules())
    return count


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _first_conv(module: nn.Module) -> nn.Module | None:
    return next((m for m in module.modules() if isinstance(m, _CONV_TYPES)), None)


def _last_computing(node: fx.Node, owner: nn.Module) -> fx.Node:
    """Walk back from ``node`` over parameter-free modules (DropPath, Identity, Dropout) to the last
    node that computes something."""
    while node.op == "call_module" and not _has_params(owner.get_submodule(node.target)):
        if len(node.all_input_nodes) != 1:
            break
        node = node.all_input_nodes[0]
    return node


def _residual_add(module: nn.Module) -> tuple[str, int | None] | None:
    """If ``module`` is a residual block: the name (relative to it) of the child module that ends
    its residual branch, and the block's output channels when the graph shows them unambiguously
    (else ``None``). Otherwise ``None``.

    Of several adds (Res2Net sums inside its branch), the residual one is the add whose branch
    holds the most convolutions.
    """
    graph = _trace(module)
    if graph is None:
        return None
    inputs = {n for n in graph.nodes if n.op == "placeholder"}
    best = None
    for node in graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        anc = {a: _ancestors(a) | {a}, b: _ancestors(b) | {b}}
        if not all(inputs & s for s in anc.values()):
            continue  # both sides must come from the block's inputs
        convs = {n: _count_convs(anc[n] - anc[other], module) for n, other in ((a, b), (b, a))}
        branch, shortcut = (a, b) if convs[a] > convs[b] else (b, a)
        if convs[branch] <= convs[shortcut] or branch in anc[shortcut]:
            continue
        end = _last_computing(branch, module)
        if end.op != "call_module" or not _has_params(module.get_submodule(end.target)):
            continue
        if best is None or convs[branch] >= best[0]:
            best = (convs[branch], end.target, _block_channels(module, branch, shortcut, convs[shortcut]))
    return None if best is None else best[1:]


def _block_channels(module: nn.Module, branch: fx.Node, shortcut: fx.Node, shortcut_convs: int) -> int | None:
    """A residual block's output width read off its graph: the shortcut's projection when it has
    one, else the input width as the first plain conv or norm that the input meets shows it."""
    proj = _last_computing(shortcut, module)
    if shortcut_convs > 0:
        return _out_channels(module.get_submodule(proj.target)) if proj.op == "call_module" else None
    if proj.op != "placeholder":
        return None
    for user in proj.users:
        if user.op != "call_module" or user not in _ancestors(branch) | {branch}:
            continue
        first = module.get_submodule(user.target)
        if isinstance(first, nn.Conv2d):
            return first.in_channels
        if isinstance(first, nn.modules.batchnorm._NormBase):
            return first.num_features
    return None


def _probe_channels(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Output channels of the modules ``names``, from one forward pass on a dummy image."""
    conv = _first_conv(model)
    p = next(model.parameters())
    if conv is None:
        return {}
    seen: dict[str, int] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.setdefault(n, o.shape[1]) if isinstance(o, torch.Tensor) else None)
        for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, conv.in_channels, 128, 128, device=p.device, dtype=p.dtype))
    except Exception:  # noqa: BLE001, S110  the caller reports the blocks whose width is still unknown
        pass
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def _out_channels(module: nn.Module) -> int | None:
    """Channels of ``module``'s output: from its last conv or norm layer in registration order."""
    if isinstance(module, Plugged):
        module = module.module
    last = None
    for m in module.modules():
        if isinstance(m, _CONV_TYPES):
            last = m.out_channels
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            last = m.num_features
        elif isinstance(m, nn.GroupNorm):
            last = m.num_channels
    return last


def find_residual_blocks(model: nn.Module) -> list[tuple[str, str, str, int]]:
    """All residual blocks of ``model``, outermost first, in registration (forward) order.

    Returns ``(block, branch_end, stage, channels)``: the block's dotted name, the module that ends
    its residual branch (absolute name), the stage (the module holding the block as a child), and
    the block's output channels. ``TypeError`` if ``model`` is not an ``nn.Module``.
    """
    _check_model(model, "find_residual_blocks")
    found: list[tuple[str, str, str, int]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, (Blend,)) or not _has_params(module):
            return
        n_convs = sum(isinstance(m, _CONV_TYPES) for m in module.modules())
        if n_convs >= 1 and prefix:
            hit = _residual_add(module)
            if hit is not None:
                end, channels = hit
                found.append((prefix, f"{prefix}.{end}", prefix.rpartition(".")[0], channels))
                return
        if n_convs < 1:
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    unknown = [end for _, end, _, ch in found if ch is None]
    if unknown:
        probed = _probe_channels(model, unknown)
        found = [(b, end, st, probed.get(end) if ch is None else ch) for b, end, st, ch in found]
    return found


# --------------------------------------------------------------------------------------------------
# plug


def _make(block: BlockSpec, channels: int, ref: nn.Module, block_kwargs: dict, gate: str,
          training: bool = True) -> Blend:
    p = next(ref.parameters(), None)
    dd = {} if p is None else {"device": p.device, "dtype": p.dtype}
    if isinstance(block, str):
        attn = create_block(block, channels, **block_kwargs, **dd)
    else:
        attn = block(channels, **block_kwargs)
        if not isinstance(attn, nn.Module):
            raise TypeError(f"plug: block factory returned {type(attn).__name__}, not an nn.Module")
        attn = attn.to(**dd)
    # the new block takes the mode of the place it goes into: plugged into a model in eval mode,
    # its batch norms use their running statistics (and leave them alone), as the model's do
    return Blend(attn, gate=gate, **dd).train(training)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _check_model(model: object, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        hint = (f" (a name? build it first, e.g. timm.create_model({model!r}))"
                if isinstance(model, str) else "")
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    return model


def _check_block(block: object) -> None:
    if isinstance(block, str):
        block_info(block)  # ValueError listing the registered blocks
    elif not callable(block):
        raise TypeError(f"plug: block must be a registered block name ({', '.join(list_blocks())}) or "
                        f"a callable(channels) -> nn.Module, got {type(block).__name__}")


def _choose_stages(stages: object, stage_names: list[str], model: nn.Module) -> list[str]:
    """The stage names picked by 1-based ``stages`` (all when ``None``)."""
    if stages is None:
        return stage_names
    if isinstance(stages, (str, bytes)) or not isinstance(stages, (int, Sequence)):
        raise TypeError(f"plug: stages must be an int or a sequence of ints (1-based), got {stages!r}")
    wanted = [stages] if isinstance(stages, int) else list(stages)
    if not wanted:
        raise ValueError("plug: stages is empty; give 1-based stage numbers, or None for all stages")
    for s in wanted:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"plug: stages must hold ints (1-based stage numbers), got {s!r} in {stages!r}")
    bad = [s for s in wanted if not 1 <= s <= len(stage_names)]
    if bad:
        raise ValueError(f"plug: stages {bad} out of range; {type(model).__name__} has "
                         f"{len(stage_names)} stages, numbered 1..{len(stage_names)} "
                         f"({', '.join(stage_names)})")
    return [stage_names[s - 1] for s in sorted(set(wanted))]


def _existing_plug(model: nn.Module, name: str) -> str | None:
    """The name of the :class:`Plugged` wrapper already at target ``name`` (an earlier ``plug``
    put a block there), or ``None``."""
    if isinstance(model.get_submodule(name), Plugged):
        return name  # after_block: the branch's last layer is already wrapped
    parent, _, child = name.rpartition(".")
    if child == "module" and isinstance(model.get_submodule(parent), Plugged):
        return parent  # after_stage: the stage is the wrapped module
    return None


def plug(model: nn.Module, block: BlockSpec, *, stages: int | Sequence[int] | None = None,
         position: str = "after_block", gate: str = "zero", replace: bool = False,
         **block_kwargs) -> list[str]:
    """Insert ``block`` into every residual block (or stage) of ``model``, in place.

    Args:
        model: a residual CNN: timm or torchvision ResNet / ResNeXt / WideResNet, timm byobnet,
            RegNet, ResNetV2, a ``features_only`` wrapper or a detector around one of them.
        block: a registered block name (see :func:`visattn.list_blocks`) or a callable
            ``(channels, **block_kwargs) -> nn.Module``.
        stages: 1-based stage numbers to plug into (default: all). A stage is a module whose
            children include residual blocks (``layer1`` in torchvision, ``stages.0`` in byobnet).
        position: ``"after_block"`` puts the block on the residual branch after its last layer and
            before the add, as SE-ResNet does; ``"after_stage"`` puts it after each stage.
        gate: ``"zero"`` (default) wraps the block in a zero-initialised :class:`Blend`,
            ``y + g * (block(y) - y)``, so the model is unchanged at insertion (for a pretrained
            backbone); ``"none"`` applies the block as its paper does, ``block(y)`` (for training
            from scratch). :func:`gate_values` reads the learned gates.
        replace: where an earlier ``plug`` already put a block, swap it for the new one (a fresh
            identity-initialised block). Without it, plugging a place twice is a ``ValueError``
            naming the places; plugging other stages or the other position is always allowed.
        **block_kwargs: keyword arguments for the block.

    Returns:
        The dotted names of the inserted (or, with ``replace``, replaced) attention modules.

    With ``gate="zero"``, right after ``plug`` the model computes what it computed before: each
    block sits behind a zero-initialised :class:`Blend`. Every argument is checked, and every block built, before the
    model is changed: on any error the model is left as it was. Raises ``TypeError`` for a
    ``model`` that is not an ``nn.Module`` (a model name, say), ``ValueError`` when no residual
    block is found.

    Example:
        >>> m = torchvision.models.resnet18()
        >>> plug(m, "cbam", stages=[3, 4])[:1]
        ['layer3.0.bn2.attn']
    """
    _check_model(model, "plug")
    _check_block(block)
    if position not in ("after_block", "after_stage"):
        raise ValueError(f"plug: position must be 'after_block' or 'after_stage', got {position!r}")
    check_gate(gate)
    if not isinstance(replace, bool):
        raise TypeError(f"plug: replace must be a bool, got {replace!r}")
    found = find_residual_blocks(model)
    if not found:
        raise ValueError(
            f"plug: found no residual block in {type(model).__name__}; looked for modules whose forward "
            "adds a branch of convolutions to a shortcut of their input (ResNet-style blocks)")
    stage_names = list(dict.fromkeys(stage for _, _, stage, _ in found))
    chosen = _choose_stages(stages, stage_names, model)

    if position == "after_block":
        targets = {end: ch for _, end, stage, ch in found if stage in chosen}
    else:
        if "" in chosen:
            raise ValueError("plug: position='after_stage' needs the residual blocks to sit in a stage "
                             "module, but they are direct children of the model; use 'after_block'")
        targets = {stage: ch for _, _, stage, ch in found if stage in chosen}  # last block's width

    existing = {name: _existing_plug(model, name) for name in targets}
    taken = [f"{p}.attn" for p in existing.values() if p is not None]
    if taken and not replace:
        raise ValueError(
            f"plug: {len(taken)} of these places already hold attention from an earlier plug "
            f"({', '.join(taken[:4])}{', ...' if len(taken) > 4 else ''}); pass replace=True to swap "
            "them for the new block, or choose other stages")

    new_blocks = {}  # build every block first: an error leaves the model untouched
    for name, channels in targets.items():
        module = model.get_submodule(name)
        if channels is None:
            raise ValueError(f"plug: cannot tell the output channels of {name} "
                             f"({type(module).__name__}) from its graph or from a forward pass")
        # the mode of the module holding the place (the residual block, or the stage's parent), not
        # of the place itself: a frozen norm ending the branch may be kept in eval while training
        parent = name.rpartition(".")[0]
        holder = model.get_submodule(parent) if parent else model
        new_blocks[name] = _make(block, channels, module, block_kwargs, gate, holder.training)

    inserted = []
    for name, blend in new_blocks.items():
        if existing[name] is not None:
            model.get_submodule(existing[name]).attn = blend
            inserted.append(f"{existing[name]}.attn")
        else:
            _replace(model, name, Plugged(model.get_submodule(name), blend))
            inserted.append(f"{name}.attn")
    return inserted
