"""The S2FT linear layer: a frozen matrix whose selected rows or columns train densely (partial back-propagation)."""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from s2ft.adapter_format import AdapterError


def contiguous_span(index: torch.Tensor) -> tuple[int, int] | None:
    """Returns ``(start, stop)`` when ``index`` is the range ``start, start + 1, ..., stop - 1``, else None."""
    if index.numel() == 0:
        return None
    start = int(index[0])
    stop = start + index.numel()
    # The ends decide most indexes at once (a switch asks this of every module); only a candidate range is compared.
    if int(index[-1]) == stop - 1 and torch.equal(index, torch.arange(start, stop, device=index.device)):
        return start, stop
    return None


def select(x: torch.Tensor, index: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    """A compact copy of ``x[..., index]``; a sliced copy when ``index`` is the contiguous range ``span``."""
    if span is None:
        return x.index_select(-1, index)
    return x[..., span[0] : span[1]].contiguous()


def _columns_contiguous(weight: torch.Tensor, axis: int) -> bool:
    return axis == 1 and weight.t().is_contiguous()


def slot_major(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor`` (a weight, or its values at some slots) stored so that each slot along ``axis`` is one contiguous
    run of memory: unchanged for rows, column-major for columns. Same shape and values; a copy only when needed."""
    if axis == 0 or _columns_contiguous(tensor, axis):
        return tensor
    return tensor.t().contiguous().t()


def read_slots(weight: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``weight.index_select(axis, index)``, in the weight's layout (column-major columns of a column-major weight)."""
    if _columns_contiguous(weight, axis):
        return weight.t().index_select(0, index).t()
    return weight.index_select(axis, index)


def write_slots(weight: torch.Tensor, axis: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """``weight.index_copy_(axis, index, values)``, by the fastest copy for the weight's layout. Values are cast to
    the weight's dtype (fp32 trainables beside a bf16 weight).

    Rows, and the columns of a column-major weight (``slot_major``), are contiguous runs: whole-run copies (3.5x faster
    than the scatter below for 31 columns of SmolLM2's 576 x 1536 down projection on CPU, when ``values`` is column-
    major too). The columns of a row-major weight go by a scatter, about 1.4x faster than ``index_copy_`` there.
    """
    values = values.to(weight.dtype)
    if axis == 0:
        weight.index_copy_(0, index, values)
    elif _columns_contiguous(weight, axis):
        weight.t().index_copy_(0, index, values.t())
    else:
        weight.scatter_(1, index.expand(weight.shape[0], -1), values)


def zero_slots(weight: torch.Tensor, axis: int, index: torch.Tensor) -> None:
    """``weight.index_fill_(axis, index, 0)``, along contiguous runs for a column-major weight's columns."""
    if _columns_contiguous(weight, axis):
        weight.t().index_fill_(0, index, 0)
    else:
        weight.index_fill_(axis, index, 0)


def _sharded(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (a ``DTensor``)."""
    # torch.distributed.tensor takes a second to import, which ``import s2ft`` should not pay; a DTensor can only
    # exist once it is imported.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype of the two with fewer bytes (``a`` on a tie): the precision two copies of one base agree at."""
    return a if torch.finfo(a).bits <= torch.finfo(b).bits else b


def _equal_narrowed(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal`` at the narrower dtype: a bf16 model's base equals the fp32 base it was cast from."""
    dtype = _narrower(a.dtype, b.dtype)
    return torch.equal(a.to(b.device, dtype), b.to(dtype))


def _base_at(
    weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor, positions: torch.Tensor, axis: int
) -> torch.Tensor:
    """The base weight at ``positions`` along ``axis`` of a ``weight`` trained at ``index``, whose base there is
    ``base`` (ordered as ``index``): read from ``weight`` away from ``index``, from ``base`` at it."""
    out = read_slots(weight, axis, positions).clone()
    lookup = torch.full((weight.shape[axis],), -1, dtype=torch.long, device=weight.device)
    lookup[index] = torch.arange(index.numel(), device=weight.device)
    slots = lookup[positions]
    hit = (slots >= 0).nonzero().squeeze(1)
    out.index_copy_(axis, hit, base.to(out.dtype).index_select(axis, slots[hit]))
    return out


def _other_base(name: str, what: str) -> str:
    return (
        f"S2FT layer {name}: the state dict's {what}, so it was saved from another base model or layout (gather or "
        "co-permuted, or permuted for another selection) and its values would land on other units. A state dict "
        "loads only into a model built as the one that saved it; to move an adapter between layouts, save it with "
        "s2ft.save_adapter(source, path) and load it with s2ft.load_adapter(base, path) or s2ft.switch_adapter"
    )


# The key under which an S2FT model's load leaves a layer's fitted result (``s2ft.state._fit_every_layer``) in
# torch's copy of the state dict, popped by the layer before torch reads its keys; absent when a layer loads alone.
FITTED = "_s2ft_fitted_weight"
_UNFITTED = object()


class S2FTLinear(nn.Module):
    """Replaces an ``nn.Linear``: the rows (``axis=0``) or columns (``axis=1``) at ``index`` train, the rest is frozen.

    While unmerged, ``weight`` holds the base matrix with the selected slots zeroed and ``values`` (the only trainable
    parameter) holds the selected rows or columns; the layer computes ``F.linear(x, weight + scatter(values), bias)``.
    In training one fused autograd function does this with one matmul forward and, backward, one matmul for the
    input gradient plus the small one for the values' gradient; the frozen weight gets no gradient, and for
    ``axis=1`` only the compact selected input columns ``x[..., index]`` are saved, not the whole input. Without
    gradients it adds the values' small matmul to the frozen one instead (no weight copy per call, for decoding).

    ``values`` may be fp32 beside a bf16 ``weight`` (training keeps trainable tensors in fp32 so that no update is lost
    to bf16 rounding): every computation casts them to the weight's dtype, and their gradient comes back in theirs.

    ``merge()`` copies ``values`` into ``weight`` (forward becomes one plain matmul); ``unmerge()`` zeroes the slots
    again. Both are exact copies (a merge rounds fp32 values to the weight's dtype). ``base_values`` keeps the base
    model's original entries at ``index``, so the base can be restored without rounding and adapter deltas (fusion)
    are exact.

    Args:
        linear: The layer to replace. Its ``weight`` and ``bias`` Parameters are reused (frozen, slots zeroed in
            place), so no copy of the full matrix is made.
        axis: 0 to train output rows (q, k, v, gate, up), 1 to train input columns (o, down).
        index: Row (axis 0) or column (axis 1) positions to train, unique; units already expanded by their size.
        unit_size: Rows/columns per unit (head_dim for heads, 1 for FFN channels); recorded for adapters.
        values: Initial values of the selected slots, shaped like ``weight.index_select(axis, index)``; default: the
            base values.
        values_dtype: The dtype ``values`` are kept in (fp32 beside a bf16 weight, as training keeps them); default:
            the weight's.
    """

    def __init__(
        self,
        linear: nn.Linear,
        axis: int,
        index: torch.Tensor,
        unit_size: int = 1,
        values: torch.Tensor | None = None,
        values_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 (output rows) or 1 (input columns), got {axis}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.axis, self.unit_size, self.merged = axis, unit_size, False
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("index", torch.empty(0, dtype=torch.long, device=self.weight.device))
        self.register_buffer("base_values", self.weight.new_empty(0))
        self.values = nn.Parameter(self.weight.new_empty(0, dtype=values_dtype))
        self.retarget(index, values)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def retarget(
        self, index: torch.Tensor, values: torch.Tensor | None = None, merged: bool = False, checked: bool = False
    ) -> None:
        """Restores the current slots to the base, then trains ``index`` starting from ``values``.

        This is how adapters are switched without rebuilding modules: only the old and new slots are touched.

        Args:
            index: The new row/column positions.
            values: Their values (default: the base values).
            merged: Leave the layer merged (the values written into ``weight``) instead of unmerged.
            checked: ``index`` was already validated (an adapter checked once at load): skip the position checks.
        """
        index = index.to(device=self.weight.device, dtype=torch.long)
        size = self.weight.shape[self.axis]
        if index.ndim != 1 or index.numel() == 0:
            raise ValueError(f"index must be a non-empty 1-D tensor of positions, got shape {tuple(index.shape)}")
        if not checked and (int(index.min()) < 0 or int(index.max()) >= size):
            raise IndexError(f"index out of range: positions must lie in [0, {size}) along axis {self.axis}")
        if not checked and torch.unique(index).numel() != index.numel():
            raise ValueError("index holds duplicate positions; each row/column can be trained only once")
        shape = list(self.weight.shape)
        shape[self.axis] = index.numel()
        if values is not None and list(values.shape) != shape:
            raise ValueError(f"values have shape {tuple(values.shape)}, expected {tuple(shape)}")
        # Adapters trained with the same selection (the same strategy and seed on other data) share their positions:
        # the weight then needs no restore, and an unmerged switch is only the copy of the values.
        same = self.index.shape == index.shape and torch.equal(self.index, index)
        with torch.no_grad():
            if same:
                base_values = self.base_values
            else:
                if self.index.numel():
                    write_slots(self.weight, self.axis, self.index, self.base_values)
                base_values = read_slots(self.weight, self.axis, index)
            # The values keep their own dtype (fp32 while training a bf16 model), so a switch loses no precision;
            # frozen values widen to the new values' dtype (fp32 values after bf16 ones) for the same reason.
            dtype = self.values.dtype
            if values is not None and not self.values.requires_grad:
                dtype = torch.promote_types(dtype, values.dtype)
            new_values = (base_values if values is None else values).to(self.weight.device, dtype)
            # base_values is a fresh read (or the layer's own), so it is kept, not copied; the index is always a copy
            # (the caller's tensor stays the caller's: a prepared adapter's positions are switched to again), and the
            # values stay the same Parameter when their size allows (an optimizer may hold it).
            self.base_values = base_values
            if self.values.shape == new_values.shape and self.values.dtype == dtype:
                if not same:
                    self.index.copy_(index)
                self.values.copy_(new_values)
            else:
                self.index = index.clone()
                if _columns_contiguous(self.weight, self.axis):  # keep the values in the weight's layout
                    new_values = slot_major(new_values, self.axis)
                self.values = nn.Parameter(new_values.clone(), requires_grad=self.values.requires_grad)
            if merged:
                write_slots(self.weight, self.axis, index, self.values)
            elif not same or self.merged:
                zero_slots(self.weight, self.axis, index)
        self.merged = merged
        if not same:
            self.span = contiguous_span(index)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The merged flag is not in the state dict (as extra state it broke FSDP2 resume: rank 1 loaded it as merged),
        # so what the incoming weight holds at the trained slots is put into this layer's state first; an S2FT
        # model's load did that before copying anything (``s2ft.state._fit_every_layer``), and left the result.
        weight = state_dict.pop(prefix + FITTED, _UNFITTED)
        if weight is _UNFITTED:
            weight = self._fit_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if weight is not None:
            with torch.no_grad():
                self.weight.copy_(weight)
        # A state dict may bring another index of the same size: the contiguous fast path must follow it.
        self.span = contiguous_span(self.index)

    @torch.no_grad()
    def _fit_state_dict(self, state_dict, prefix: str) -> torch.Tensor | None:
        """Puts the incoming weight into this layer's merged state; when ``state_dict`` brings none but this layer's
        weight must change, returns the weight to copy in after the load. Wrong shapes are left to the load itself.

        The trained slots of a saved weight tell its state: zeros when unmerged, the values (in the weight's dtype)
        when merged; zero values read as both, and both then give the same weight. A state dict without the weight
        (a checkpoint keeps the trained tensors only) that moves the slots or brings values into a merged layer
        needs this layer's weight with the old slots restored from ``base_values`` and the new ones set.

        The state dict does not say in which unit order it was saved (a co-permuted model's, the gather layout's
        original one, or another selection's permutation; ``S2FTState.unit_perms`` is not in it), so its base must be
        this layer's base, compared exactly (at the narrower of the two dtypes): a whole weight everywhere, trained
        tensors alone at their slots. A dict of another order loaded anyway computed the source's function but under
        this model's permutation, so ``save_adapter``, ``switch_adapter`` and ``merge_and_unload`` then moved the
        wrong units.

        Raises:
            AdapterError: The incoming weight holds neither zeros nor the values at the slots, the incoming base (the
                weight away from the slots, ``base_values`` at them) is not this layer's (another layout or base
                model), or a sharded (FSDP2) weight would need converting; this layer loads nothing then.
        """
        index = state_dict.get(prefix + "index", self.index)
        values = state_dict.get(prefix + "values", self.values)
        weight = state_dict.get(prefix + "weight")
        size = self.weight.shape[self.axis]
        if (
            not torch.is_tensor(index)
            or index.shape != self.index.shape
            or index.is_floating_point()
            or values.shape != self.values.shape
            or (weight is not None and weight.shape != self.weight.shape)
            or int(index.min()) < 0
            or int(index.max()) >= size
        ):
            return None
        # FSDP2's loader fills in what the dict lacks with the layer's own tensors: that weight is not a given one.
        given = weight is not None and weight is not self.weight
        name = prefix.rstrip(".") or "(root)"
        base = state_dict.get(prefix + "base_values")
        if base is not None and base.shape != self.base_values.shape:
            return None
        if not given:
            moved = not torch.equal(index.to(self.index.device), self.index)
            if not moved and base is not None and not _equal_narrowed(base, self.base_values):
                raise AdapterError(_other_base(name, "base_values are not this model's weights at its trained slots"))
            if not moved and not (self.merged and prefix + "values" in state_dict):
                return None
            self._refuse_sharded(name)
            weight = self.weight.detach().clone()
            write_slots(weight, self.axis, self.index, self.base_values)
            index = index.to(weight.device)
            if base is not None and not _equal_narrowed(base, read_slots(weight, self.axis, index)):
                raise AdapterError(_other_base(name, "base_values are not this model's weights at its trained slots"))
        else:
            self._refuse_sharded(name, weight)
            index = index.to(weight.device)
            slots = read_slots(weight, self.axis, index)
            merged = bool(slots.any())
            if merged and not torch.equal(slots, values.to(weight.device, weight.dtype)):
                raise AdapterError(
                    f"S2FT layer {name}: the state dict's weight holds at the trained slots neither zeros (an "
                    "unmerged S2FT layer's) nor its values (a merged one's), so which function it means cannot be "
                    "told (a plain model's weights?). Load the state dict of an S2FT model of this base "
                    "(model.state_dict()), or an adapter with s2ft.load_adapter / s2ft.switch_adapter"
                )
            if not self._same_base(weight, index, base):
                raise AdapterError(_other_base(name, "weight is not this model's base weight in this unit order"))
            if merged == self.merged:
                return None
            # In this layer's dtype, so that merged values are rounded to it once (a bf16 dict into an fp32 layer).
            weight = weight.to(self.weight.dtype, copy=True)
        if self.merged:
            write_slots(weight, self.axis, index, values.to(weight.device))
        else:
            zero_slots(weight, self.axis, index)
        if not given:
            return weight
        state_dict[prefix + "weight"] = weight  # torch's load works on its own copy of the caller's dict
        return None

    def _same_base(self, weight: torch.Tensor, index: torch.Tensor, base: torch.Tensor | None) -> bool:
        """Whether ``weight`` (trained at ``index``, base ``base`` there; unknown when None) holds this layer's base.

        Compares the two weights where neither is trained, then the base values at the slots of either: one
        elementwise pass over the matrix, no copy of it (unless the dtypes differ).
        """
        dtype, device = _narrower(weight.dtype, self.weight.dtype), self.weight.device
        ours, weight, index = self.weight.to(dtype), weight.to(device, dtype), index.to(device)
        same = (weight == ours).all(dim=1 - self.axis)
        positions = torch.cat([self.index, index]).unique()
        same[positions] = True
        if not bool(same.all()):
            return False
        own = _base_at(ours, self.index, self.base_values, positions, self.axis)
        # Without base_values the dict does not say its base at its own slots: only the rest can be compared there.
        base = own.index_select(self.axis, positions.searchsorted(index)) if base is None else base.to(device)
        theirs = _base_at(weight, index, base, positions, self.axis)
        return torch.equal(theirs, own)

    def _refuse_sharded(self, name: str, weight: torch.Tensor | None = None) -> None:
        if _sharded(self.weight) or _sharded(weight):
            raise AdapterError(
                f"S2FT layer {name}: this state dict moves the trained slots or is in the other merged state, which "
                "cannot be converted on a sharded (FSDP2) weight; load it into the unsharded model"
            )

    def store_slot_major(self) -> None:
        """Stores ``weight`` (and ``base_values``, and ``values`` unless they train) so that every trained slot is a
        contiguous run: trained columns go column-major. Values are unchanged (one copy of the matrix, once), results
        up to rounding: a matmul may round differently in another layout (fp32, one input row on CPU: ~1e-6
        relative). What it buys is switching adapters by whole-run copies instead of a write into every row of the
        weight.

        Trainable ``values`` keep their layout: an optimizer may hold state for them, and torch's fused AdamW steps a
        parameter and its state as flat memory, so a parameter relaid under its state would be updated wrongly.
        """
        if self.axis == 0 or _columns_contiguous(self.weight, self.axis):
            return  # rows are runs already; a slot-major weight keeps new values so (``retarget``)
        with torch.no_grad():
            self.weight.data = slot_major(self.weight.data, self.axis)
            if not self.values.requires_grad:
                self.values.data = slot_major(self.values.data, self.axis)
            self.base_values = slot_major(self.base_values, self.axis)

    @property
    def units(self) -> torch.Tensor:
        """The trained unit indices (in this layer's current coordinates), in the order of ``values``."""
        return self.index[:: self.unit_size] // self.unit_size

    def merge(self) -> None:
        """Writes ``values`` into ``weight``: forward becomes a plain ``F.linear``."""
        if not self.merged:
            with torch.no_grad():
                write_slots(self.weight, self.axis, self.index, self.values)
            self.merged = True

    def unmerge(self) -> None:
        """Zeroes the selected slots of ``weight`` again (the trained values stay in ``values``)."""
        if self.merged:
            with torch.no_grad():
                zero_slots(self.weight, self.axis, self.index)
            self.merged = False

    def restore_base(self) -> None:
        """Writes the base model's original entries back into ``weight`` (used when unloading without merging)."""
        with torch.no_grad():
            write_slots(self.weight, self.axis, self.index, self.base_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and self.values.requires_grad and torch.is_grad_enabled():
                raise AdapterError(
                    "S2FT adapter is merged, so its values get no gradient: call s2ft.unmerge_adapter(model) before "
                    "training, or model.eval() / torch.no_grad() to run the merged model"
                )
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (self.values.requires_grad or x.requires_grad):
            return _S2FTLinearFunction.apply(x, self.values, self.weight, self.bias, self.index, self.axis, self.span)
        # Inference: two matmuls instead of building the merged weight, which would cost a weight copy per call.
        out = F.linear(x, self.weight, self.bias)
        values = self.values.to(self.weight.dtype)
        if self.axis == 0:
            return out.index_add(-1, self.index, F.linear(x, values).to(out.dtype))
        return out + F.linear(select(x, self.index, self.span), values)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, axis={self.axis}, "
            f"trained={self.index.numel()}, unit_size={self.unit_size}, contiguous={self.span is not None}, "
            f"merged={self.merged}"
        )


def plain_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding ``module``'s own ``weight`` and ``bias`` Parameters (not copies): what replaces a
    wrapped projection (``S2FTLinear``, ``s2ft.multi_adapter.MultiAdapterLinear``) when its adapter is gone."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight, linear.bias = module.weight, module.bias
    return linear


class _S2FTLinearFunction(torch.autograd.Function):
    """``F.linear(x, weight with values scattered in, bias)`` with the fewest flops and the least saved memory.

    Forward builds the merged weight (a copy of one matrix, cheap next to the matmul) and runs one matmul, so no flop
    is spent on the zeroed slots. Backward rebuilds it for the input gradient and computes only the values' gradient:
    ``grad[..., index]^T @ x`` (rows) or ``grad^T @ x[..., index]`` (columns). Saved: ``x`` for rows (needed for the
    values' gradient), only the compact ``x[..., index]`` for columns; frozen tensors get no gradient.
    """

    @staticmethod
    def forward(ctx, x, values, weight, bias, index, axis, span):
        ctx.axis, ctx.span = axis, span
        ctx.save_for_backward(x if axis == 0 else select(x, index, span), values, weight, index)
        return F.linear(x, weight.index_copy(axis, index, values.to(weight.dtype)), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved_input, values, weight, index = ctx.saved_tensors
        # Under autocast the forward matmul ran in grad's (lower) precision; do the same here.
        grad_input = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_input = grad @ weight.index_copy(ctx.axis, index, values.to(weight.dtype)).to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_rows = grad if ctx.axis == 1 else select(grad, index, ctx.span)
            grad_values = (grad_rows.flatten(0, -2).T @ saved_input.flatten(0, -2).to(grad.dtype)).to(values.dtype)
        return grad_input, grad_values, None, None, None, None, None
