"""``--blocks_to_swap N``: the frozen weights of a transformer's last N blocks wait in CPU memory
and visit the accelerator only while their block runs (the meaning of kohya sd-scripts' and
musubi-tuner's flag).

What moves: every parameter of a swapped block that does not train (``requires_grad`` False)
and is not part of a SNELLA adapter: the base linears' weights (plain, float8 storage, torchao or
optimum-quanto tensors), biases and norm weights. The trainable SNELLA factors and scalars and
every buffer stay on the device. Each frozen weight has one home copy in CPU memory (pinned when
CUDA is available); a visit is a copy of the home onto the device that is dropped afterwards
(nothing is ever copied back: the weights are frozen).

The schedule, for blocks ``0..M-1`` run in that order and the swapped set ``M-N..M-1``:

- forward (with or without grad): before block ``i`` runs its weights are on the device (copied
  then if the copy was not already made) and the copy of block ``i+1`` starts; after block ``i``
  its copy is dropped (in a training forward too: see below), except the last block's after a
  forward with grad, whose backward comes first;
- backward: when the gradient of block ``i``'s outputs is ready (a hook on those outputs), the
  copies of the blocks after ``i`` are dropped (their backward is over), block ``i`` is on the
  device (for gradient checkpointing's recompute, which runs its forward again, and for its
  backward) and the copy of block ``i-1`` starts; when the backward ends every copy is dropped.

Without gradient checkpointing autograd would keep each block's weights alive for the backward;
while a swapped block runs a training forward, tensors that autograd saves and that are views
of the block's device weights are saved as references to the weight instead (``saved_tensors_hooks``)
and read back from the copy made for the backward. Weights that a layer derives before its
product (float8 storage cast to the compute dtype by layerwise casting) are saved as they are.

On CUDA the copies run on a side stream, each followed by an event the compute stream waits on
before the block runs; on the CPU a visit is a plain copy on the same device, so the schedule
runs (and is tested) without an accelerator. A weight type whose ``.to()`` cannot copy it
(bitsandbytes ``Params4bit``) is refused by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .adapter import SnellaAdapter
from .errors import SnellaError

__all__ = ["BlockSwap", "BlockSwapError", "SwapEvent", "frozen_parameters", "move_except_blocks"]

logger = logging.getLogger(__name__)

# Weight types whose device copy is not a plain ``.to(device, copy=True)``, refused by name.
_UNMOVABLE_WEIGHTS = {"Params4bit": "bitsandbytes Params4bit (its .to() packs and takes no copy)",
                      "Int8Params": "bitsandbytes Int8Params (its .to() quantizes)"}


class BlockSwapError(SnellaError):
    """``--blocks_to_swap`` cannot apply to this model (no blocks, too many, an unmovable weight)."""


@dataclass(frozen=True)
class SwapEvent:
    """One entry of the swap log: ``kind`` is "load" (a copy onto the device started; ``how`` is
    "prefetch" or "demand"), "evict" (the copy dropped), "forward" / "recompute" (the block is
    about to run its forward / its checkpointed forward again in backward) or "backward" (the
    gradient of its outputs is ready)."""

    kind: str
    block: int
    how: str = ""


@dataclass
class _Slot:
    """A swapped block: its frozen weights ``(owner module, parameter name, home tensor)``, the
    device copies while it visits, and the event that marks the copy done (CUDA)."""

    block: nn.Module
    weights: list[tuple[nn.Module, str, Tensor]] = field(default_factory=list)
    resident: Optional[list[Tensor]] = None
    ready: Optional[Any] = None
    storages: dict[int, int] = field(default_factory=dict)


def frozen_parameters(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(owner module, parameter name)`` of every parameter of ``block`` that does not train and
    is not inside a SNELLA adapter (whose scalars stay on the device even when frozen)."""
    adapters = {id(module) for adapter in block.modules() if isinstance(adapter, SnellaAdapter)
                for module in adapter.modules()}
    found = []
    for module in block.modules():
        if id(module) in adapters:
            continue
        for name, parameter in module._parameters.items():
            if parameter is not None and not parameter.requires_grad:
                found.append((module, name))
    return found


def move_except_blocks(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device) -> None:
    """``model.to(device)`` leaving ``blocks`` (modules of ``model``'s ``nn.ModuleList``s) where
    they are: each is swapped out of its list for the move and put back."""
    chosen = {id(block) for block in blocks}
    parked: list[tuple[nn.ModuleList, str, nn.Module]] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for key, child in list(module._modules.items()):
                if id(child) in chosen:
                    parked.append((module, key, child))
                    module._modules[key] = nn.Identity()
    try:
        model.to(device)
    finally:
        for owner, key, child in parked:
            owner._modules[key] = child


def _as_parameter(tensor: Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _plain_storage(tensor: Tensor) -> Optional[int]:
    """The data pointer of a plain tensor's storage, None for tensor subclasses."""
    if type(tensor) not in (Tensor, nn.Parameter):
        return None
    return tensor.untyped_storage().data_ptr()


def _pinned(tensor: Tensor) -> Tensor:
    """``tensor`` in pinned host memory, or as it is when its type cannot pin (a tensor subclass
    without ``pin_memory``: its copies to the device are then synchronous)."""
    try:
        return tensor.pin_memory()
    except (RuntimeError, NotImplementedError, TypeError):
        logger.warning("--blocks_to_swap: a %s weight cannot be pinned; its copies to the device will not "
                       "overlap compute", type(tensor).__name__)
        return tensor


def _record_stream(tensor: Tensor, stream: Any) -> None:
    """Tell the CUDA allocator ``tensor`` (or a subclass's inner tensors) is used on ``stream``."""
    if hasattr(tensor, "__tensor_flatten__"):
        for name in tensor.__tensor_flatten__()[0]:
            _record_stream(getattr(tensor, name), stream)
    else:
        tensor.record_stream(stream)


class BlockSwap:
    """The last ``count`` of ``blocks`` (in forward order) keep their frozen weights in CPU memory
    and visit ``device`` for their forward, recompute and backward (see the module docstring).

    Call :meth:`attach` once the model's trainable parameters exist (after the adapters are
    attached): it moves the homes to CPU memory, everything else of the swapped blocks to
    ``device``, and installs the hooks; :meth:`detach` brings every weight back to the device.
    ``model`` is the module whose ``gradient_checkpointing`` attribute says whether the blocks
    are checkpointed. With ``record=True`` every load, evict and block call is appended to
    ``log`` (:class:`SwapEvent`).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], count: int, device: torch.device | str,
                 record: bool = False, where: str = "--blocks_to_swap") -> None:
        if not blocks:
            raise BlockSwapError(f"{where}: {type(model).__name__} has no transformer blocks to swap")
        if not 1 <= count <= len(blocks):
            raise BlockSwapError(f"{where}={count}: {type(model).__name__} has {len(blocks)} blocks "
                                 f"(swap between 1 and {len(blocks)})")
        self.model = model
        self.blocks = list(blocks)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.first_swapped = len(blocks) - count
        self.slots = {index: _Slot(block) for index, block in enumerate(self.blocks) if index >= self.first_swapped}
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.pin = cuda
        self.log: Optional[list[SwapEvent]] = [] if record else None
        self._handles: list[Any] = []
        self._backward_running = False
        self._backward_seen: set[int] = set()
        self._saving: list[tuple[int, Any]] = []

    def home_bytes(self) -> int:
        """Bytes of frozen weights kept in CPU memory (0 before :meth:`attach`)."""
        return sum(_nbytes(home) for slot in self.slots.values() for _, _, home in slot.weights)

    # --- setup -----------------------------------------------------------------------------------

    def attach(self) -> None:
        """Home the swapped blocks' frozen weights in CPU memory (pinned on CUDA), move their
        other tensors to the device, and install the hooks."""
        for index, slot in self.slots.items():
            for owner, name in frozen_parameters(slot.block):
                weight = owner._parameters[name]
                kind = type(weight).__name__
                if kind in _UNMOVABLE_WEIGHTS:
                    raise BlockSwapError(f"--blocks_to_swap: block {index} holds a {_UNMOVABLE_WEIGHTS[kind]}: "
                                         "swapping cannot move it; use --quantize_base fp8 or int8, or drop the flag")
                home = weight.detach().to("cpu")
                if self.pin:
                    home = _pinned(home)
                slot.weights.append((owner, name, home))
                owner._parameters[name] = _as_parameter(home)
            homed = {(id(owner), name) for owner, name, _ in slot.weights}
            for module in slot.block.modules():
                for name, parameter in module._parameters.items():
                    if parameter is not None and (id(module), name) not in homed:
                        parameter.data = parameter.data.to(self.device)
                for name, buffer in module._buffers.items():
                    if buffer is not None:
                        module._buffers[name] = buffer.to(self.device)
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(index)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(index), always_call=True))

    def detach(self) -> None:
        """Remove the hooks and put every swapped weight back on the device for good."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for index, slot in self.slots.items():
            self._load(index, "demand")
            self._wait(index)
            slot.resident = None
            slot.weights = []

    # --- moves -----------------------------------------------------------------------------------

    def _note(self, kind: str, block: int, how: str = "") -> None:
        if self.log is not None:
            self.log.append(SwapEvent(kind, block, how))

    def _load(self, index: int, how: str) -> None:
        """Start copying block ``index``'s weights onto the device (on the side stream on CUDA)."""
        slot = self.slots.get(index)
        if slot is None or slot.resident is not None:
            return
        self._note("load", index, how)
        copies = []
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                copies = [home.to(self.device, non_blocking=True) for _, _, home in slot.weights]
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.stream)
        else:
            copies = [home.to(self.device, copy=True) for _, _, home in slot.weights]
        slot.resident = copies
        slot.storages = {}
        for position, ((owner, name, _), copy) in enumerate(zip(slot.weights, copies)):
            owner._parameters[name] = _as_parameter(copy)
            storage = _plain_storage(copy)
            if storage is not None:
                slot.storages[storage] = position

    def _wait(self, index: int) -> None:
        """Make the compute stream wait for block ``index``'s copy (CUDA); no-op elsewhere."""
        slot = self.slots.get(index)
        if slot is None or slot.ready is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(slot.ready)
        for copy in slot.resident or ():
            _record_stream(copy, current)
        slot.ready = None

    def _ensure(self, index: int) -> None:
        if index in self.slots:
            self._load(index, "demand")
            self._wait(index)

    def _evict(self, index: int) -> None:
        """Drop block ``index``'s device copies: its parameters point at the homes again."""
        slot = self.slots.get(index)
        if slot is None or slot.resident is None:
            return
        self._wait(index)
        self._note("evict", index)
        for owner, name, home in slot.weights:
            owner._parameters[name] = _as_parameter(home)
        slot.resident = None
        slot.storages = {}

    # --- hooks -----------------------------------------------------------------------------------

    def _checkpointing(self) -> bool:
        return bool(getattr(self.model, "gradient_checkpointing", False))

    def _make_pre_hook(self, index: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            if self._backward_running:
                self._note("recompute", index)
                self._ensure(index)
                return
            if index == 0:
                self._evict_all()
            self._ensure(index)
            self._load(index + 1, "prefetch")
            self._note("forward", index)
            if index in self.slots and torch.is_grad_enabled() and not self._checkpointing():
                saving = torch.autograd.graph.saved_tensors_hooks(self._make_pack(index), self._make_unpack(index))
                saving.__enter__()
                self._saving.append((index, saving))
        return pre_hook

    def _make_post_hook(self, index: int) -> Callable[..., None]:
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._backward_running:
                return
            if self._saving and self._saving[-1][0] == index:
                self._saving.pop()[1].__exit__(None, None, None)
            if not (torch.is_grad_enabled() and index == len(self.blocks) - 1):
                self._evict(index)
            if torch.is_grad_enabled():
                for tensor in _tensors_of(output):
                    if tensor.requires_grad:
                        tensor.register_hook(self._make_grad_hook(index))
        return post_hook

    def _make_grad_hook(self, index: int) -> Callable[[Tensor], None]:
        def grad_hook(grad: Tensor) -> None:
            if index in self._backward_seen:
                return
            if not self._backward_running:
                self._backward_running = True
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._backward_seen.add(index)
            for later in sorted(self.slots):
                if later > index:
                    self._evict(later)
            self._ensure(index)
            self._load(index - 1, "prefetch")
            self._note("backward", index)
        return grad_hook

    def _evict_all(self) -> None:
        for index in sorted(self.slots):
            self._evict(index)

    def _backward_done(self) -> None:
        self._evict_all()
        self._backward_running = False
        self._backward_seen = set()

    def _make_pack(self, index: int) -> Callable[[Tensor], Any]:
        slot = self.slots[index]

        def pack(tensor: Tensor) -> Any:
            storage = _plain_storage(tensor) if slot.storages else None
            position = slot.storages.get(storage) if storage is not None else None
            if position is None or tensor.device != self.device:
                return tensor
            return _WeightView(position, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        return pack

    def _make_unpack(self, index: int) -> Callable[[Any], Tensor]:
        slot = self.slots[index]

        def unpack(saved: Any) -> Tensor:
            if not isinstance(saved, _WeightView):
                return saved
            self._ensure(index)
            owner, name, _ = slot.weights[saved.position]
            weight = owner._parameters[name].detach()
            return weight.as_strided(saved.shape, saved.stride, saved.offset)
        return unpack


@dataclass(frozen=True)
class _WeightView:
    """A saved tensor that was a view of a swapped weight: read back from its next device copy."""

    position: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _nbytes(tensor: Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):
        return sum(_nbytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


def _tensors_of(output: Any) -> list[Tensor]:
    """The tensors in a block's output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors_of(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors_of(item)]
    return []
