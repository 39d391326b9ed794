"""Scale-out: DDP, FSDP (FSDP1) and FSDP2 for :class:`~rlopt.module.PolicyOptModule`.

    rlopt-train trainer=ddp      # replicated weights, gradients all-reduced (CPU gloo or GPU nccl)
    rlopt-train trainer=fsdp     # FSDP1 through Lightning's FSDPStrategy (GPU only)
    rlopt-train trainer=fsdp2    # FSDP2 (fully_shard) through FSDP2Strategy, a ModelParallelStrategy (GPU, or CPU gloo)

The module shards its policy (and the frozen reference model) itself, in ``configure_model``
(:func:`configure_sharding`): one unit per decoder block (:func:`rlopt.models.decoder_layer_classes`)
plus the model root. Lightning's own FSDP wrapping would make the whole LightningModule the root unit
and run ``training_step`` inside its forward; with manual optimisation (several backward passes inside
that forward) FSDP1's backward bookkeeping then breaks (Lightning issue #19685). With the policy as
its own root every forward/backward is an ordinary FSDP iteration.

Sharded generation: every forward of a sharded model is a collective (all-gather of each block), so
all ranks must run the same number of decoding steps; the module passes ``synced_gpus=True`` to
``generate`` when the policy is sharded and the world size is > 1 (:func:`synced_generation`).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor

from .models import decoder_layer_classes
from .ranks import is_global_zero, reduce_max, world_size

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SHARDED_MODULES = ("policy", "ref_policy")  # the PolicyOptModule attributes that get sharded


def _dtype(name: str | torch.dtype | None, key: str) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"{key}={name!r} is not valid; valid choices: {', '.join(_DTYPES)}, null")
    return _DTYPES[name]


# ----------------------------------------------------------------------------------- strategies
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy set up for pure FSDP2 (data parallel over all ranks) with
    the fully_shard options the module applies in ``configure_model``.

    ``param_dtype``: ``"auto"`` (bfloat16 on GPU, float32 on CPU), a dtype name or null (float32);
    gradients are reduced in ``reduce_dtype``. ``reshard_after_forward`` frees each block's gathered
    weights after its forward (ZeRO-3; false keeps them until backward, ZeRO-2-like). ``cpu_offload``
    keeps shards and optimizer state on the CPU. ``activation_checkpointing`` recomputes each block
    of the policy in backward. ``sync_module_states`` broadcasts rank 0's weights while sharding
    (ranks that loaded or warmed up the model slightly differently then agree).
    ``save_distributed_checkpoint=False`` (the default here) writes one consolidated checkpoint file
    through the Trainer's CheckpointIO plugin (``AtomicCheckpointIO``) and loads it with
    ``weights_only``; true writes a sharded folder with ``torch.distributed.checkpoint``.

    On CPU the ModelParallelStrategy needs nothing extra: the device mesh is built with
    ``init_device_mesh("cpu", ...)`` on a gloo process group and FSDP2 runs its all-gathers and
    reduce-scatters on gloo. The only change for pure FSDP2 is the mesh shape: the parent's
    ``"auto"`` sizes (data parallel = nodes, tensor parallel = devices per node) would make a
    tensor-parallel group that this module does not use, so here data parallel = world size.
    """

    def __init__(self, param_dtype: str | None = "auto", reduce_dtype: str | None = "float32",
                 reshard_after_forward: bool | int = True, cpu_offload: bool = False,
                 activation_checkpointing: bool = False, sync_module_states: bool = True,
                 data_parallel_size: Literal["auto"] | int = "auto", save_distributed_checkpoint: bool = False,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if param_dtype != "auto":
            _dtype(param_dtype, "param_dtype")
        self.param_dtype = param_dtype
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = bool(cpu_offload)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.sync_module_states = bool(sync_module_states)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def fsdp2_options(self) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        param = self.param_dtype
        if param == "auto":
            param = torch.bfloat16 if self.root_device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        param = _dtype(param, "param_dtype")
        mp = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=self.reduce_dtype if param is not None else None)
        return dict(reshard_after_forward=self.reshard_after_forward, mp_policy=mp,
                    offload_policy=CPUOffloadPolicy() if self.cpu_offload else None,
                    activation_checkpointing=self.activation_checkpointing,
                    sync_module_states=self.sync_module_states)


def fsdp_mixed_precision(param_dtype: str | None = "bfloat16", reduce_dtype: str | None = "float32",
                         buffer_dtype: str | None = None) -> Any:
    """An FSDP1 ``MixedPrecision`` from dtype names (for Hydra configs): by default bf16 compute with
    fp32 gradient reduction (Lightning's ``bf16-mixed`` default would reduce in bf16) and buffers
    (rotary frequencies) left in float32."""
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=_dtype(param_dtype, "param_dtype"), reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"),
                          buffer_dtype=_dtype(buffer_dtype, "buffer_dtype"))


# ----------------------------------------------------------------------------------- sharding
def configure_sharding(module: Any) -> None:
    """``PolicyOptModule.configure_model``: shard the policy and the reference model under FSDP
    (FSDPStrategy) or FSDP2 (ModelParallelStrategy); a no-op under any other strategy."""
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)) and getattr(module, "chunked_lm_head", False):
        # it calls the inner decoder and the head weight directly, around the root unit's forward,
        # which is where FSDP gathers the embeddings and the head
        raise ValueError("chunked_lm_head=true is not supported with FSDP / FSDP2 (trainer=fsdp, trainer=fsdp2): "
                         "the root unit's weights (embeddings, head) are only gathered in its forward; "
                         "set chunked_lm_head=false or use trainer=ddp")
    if isinstance(strategy, ModelParallelStrategy):
        _configure_fsdp2(module, strategy)
    elif isinstance(strategy, FSDPStrategy):
        _configure_fsdp1(module, strategy)


def _configure_fsdp2(module: Any, strategy: ModelParallelStrategy) -> None:
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"the ModelParallelStrategy has tensor_parallel_size={mesh['tensor_parallel'].size()}; rlopt shards with "
            "FSDP2 only (no tensor-parallel plan): use trainer=fsdp2 (rlopt.distributed.FSDP2Strategy) or "
            "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)")
    options = strategy.fsdp2_options() if isinstance(strategy, FSDP2Strategy) else {}
    for name in SHARDED_MODULES:
        model = getattr(module, name, None)
        if model is None:
            continue
        opts = dict(options)
        if name != "policy":
            opts["activation_checkpointing"] = False  # the reference never runs backward
        shard_fsdp2(model, mesh["data_parallel"], **opts)


def shard_fsdp2(model: torch.nn.Module, mesh: Any, reshard_after_forward: bool | int = True, mp_policy: Any = None,
                offload_policy: Any = None, activation_checkpointing: bool = False,
                sync_module_states: bool = True) -> torch.nn.Module:
    """``fully_shard`` each decoder block of ``model``, then the model itself (embeddings, final norm,
    head: the root). Idempotent. With ``sync_module_states`` rank 0's weights are broadcast into the
    shards (``set_model_state_dict(broadcast_from_rank0=True)``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return model
    classes = tuple(decoder_layer_classes(model))
    blocks = [m for m in model.modules() if isinstance(m, classes)]
    if not blocks:
        raise ValueError(f"no decoder blocks found in {type(model).__name__} (looked for {sorted(c.__name__ for c in classes)} "
                         "and any class named *DecoderLayer); FSDP needs one unit per transformer block")
    full = model.state_dict() if sync_module_states and world_size() > 1 and is_global_zero() else {}
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=mp_policy or MixedPrecisionPolicy(), offload_policy=offload_policy or OffloadPolicy())
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if sync_module_states and world_size() > 1:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _configure_fsdp1(module: Any, strategy: FSDPStrategy) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # Lightning must not wrap the LightningModule root (it finds FSDP units and leaves it alone);
    # its auto-wrap policy is used here, extended by the model's own *DecoderLayer classes.
    policy = strategy.kwargs.pop("auto_wrap_policy", None)
    classes = decoder_layer_classes(module.policy)
    if policy is None or isinstance(policy, ModuleWrapPolicy):
        policy = ModuleWrapPolicy(classes | set(getattr(policy, "_module_classes", ())))
    ac = dict(getattr(strategy, "_activation_checkpointing_kwargs", None) or {})
    strategy._activation_checkpointing_kwargs = {}  # applied below to the policy only (the reference never runs backward)
    kwargs = {k: v for k, v in strategy.kwargs.items() if k != "device_mesh"}
    kwargs.setdefault("use_orig_params", True)
    kwargs.setdefault("sync_module_states", True)
    for name in SHARDED_MODULES:
        model = getattr(module, name, None)
        if model is None or isinstance(model, FSDP):
            continue
        wrapped = FSDP(model, auto_wrap_policy=policy, cpu_offload=strategy.cpu_offload,
                       mixed_precision=strategy.mixed_precision_config, sharding_strategy=strategy.sharding_strategy,
                       device_id=strategy.root_device.index, **kwargs)
        if name == "policy" and ac:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, tuple(classes)))
        setattr(module, name, wrapped)


# ----------------------------------------------------------------------------------- runtime helpers
def is_fsdp1(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP1-wrapped or FSDP2-sharded (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return is_fsdp1(model) or isinstance(model, FSDPModule)


def synced_generation(model: torch.nn.Module) -> bool:
    """``generate`` must keep all ranks stepping together (``synced_gpus=True``)."""
    return is_sharded(model) and world_size() > 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model (an FSDP1 wrapper's inner module; an FSDP2 model is itself)."""
    return model.module if is_fsdp1(model) else model


@contextlib.contextmanager
def generation_model(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model to call ``generate`` on. FSDP1: the inner transformers model with the root unit's
    own weights (embeddings, head) gathered (``summon_full_params(recurse=False)``); the blocks
    gather theirs in their forward. FSDP2 / unsharded: the model itself."""
    if is_fsdp1(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, recurse=False, writeback=False):
            yield model.module
    else:
        yield model


def clip_grad_norm(model: torch.nn.Module, max_norm: float, device: torch.device | None = None) -> Tensor:
    """Clip the gradients of ``model`` to ``max_norm`` (inf: no clipping) and return the total norm
    over all ranks' shards as a plain tensor (the same value on every rank)."""
    if is_fsdp1(model):
        return model.clip_grad_norm_(max_norm).detach()
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    return (full() if full is not None else norm).detach()


def clip_grad_norm_all_finite(model: torch.nn.Module, max_norm: float, device: torch.device | None = None
                              ) -> tuple[Tensor, bool]:
    """``clip_grad_norm`` and whether the norm is finite on every rank (the same answer on all ranks,
    so that they all apply or all skip the update)."""
    norm = clip_grad_norm(model, max_norm, device=device)
    finite = bool(torch.isfinite(norm))
    if world_size() > 1:  # any rank non-finite -> all skip
        finite = not bool(reduce_max(torch.tensor(0.0 if finite else 1.0, device=device)))
    return norm, finite


def full_state_dict(model: torch.nn.Module, every_rank: bool = False) -> dict[str, Tensor] | None:
    """The consolidated state dict of a sharded model on CPU (on rank 0; other ranks get ``{}``),
    gathered with ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``: every rank
    must call it. ``every_rank``: every rank gets the full values, on the parameters' device
    (``cpu_offload=False``). ``None`` for an unsharded model (use its own ``state_dict``)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank))


def flat_parameters(model: torch.nn.Module, names: list[str]) -> Tensor:
    """The parameters named ``names`` as one flat tensor, in that order (``parameters_to_vector``
    of the unsharded model when ``names`` is its ``named_parameters()`` order). Sharded (FSDP /
    FSDP2): gathered by ``full_state_dict(every_rank=True)``, a collective every rank must call."""
    state = full_state_dict(model, every_rank=True)
    if state is None:
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in names])
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"the sharded model's full state dict lacks {missing[:3]} (of {len(missing)} parameters)")
    return torch.cat([state[n].detach().reshape(-1) for n in names])


def export_policy(policy: torch.nn.Module, tokenizer: Any, path: str) -> str:
    """Save the policy and tokenizer with ``save_pretrained`` (transformers can reload them); a LoRA
    policy is exported merged (a plain transformers model).

    Sharded (FSDP / FSDP2): every rank must call it; the full weights are gathered to rank 0's CPU
    and rank 0 writes them. Unsharded: only global rank 0 writes (other ranks return at once)."""
    import copy

    from .models import is_peft

    state = full_state_dict(policy)  # collective when sharded, else None
    if is_global_zero():
        kwargs = {} if state is None else {"state_dict": state}
        model = unwrap(policy)
        if is_peft(model):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path, **kwargs)
        tokenizer.save_pretrained(path)
    if state is not None and dist.is_initialized():
        dist.barrier()  # the folder is complete when any rank returns
    return path
