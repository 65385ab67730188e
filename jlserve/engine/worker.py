"""Worker extension: the code that changes weights inside every vLLM worker (each TP rank).

vLLM mixes this class into its worker class (`--worker-extension-cls`), so its methods
run on every rank through `collective_rpc("jlserve_...")`. Arguments arrive by msgpack
(str-keyed dicts of CPU tensors). Both apply paths hand the full HF tensors to vLLM's own
weight loaders, which know each layer's fused shards and tensor-parallel slice
(`output_sizes`, `tp_rank`, `num_kv_head_replicas`, ...), so names and TP offsets are
never re-derived here:

- in place (dense, unquantized parameters, e.g. GPU): only the changed positions travel,
  as (flat index, value) patches in checkpoint coordinates; vLLM's
  `load_checkpoint_weight_patches` turns each into a NaN-masked checkpoint tensor and
  runs it through `model.load_weights`, so every rank writes only the positions in its
  own shard into the existing parameter storage (which CUDA graphs keep pointing at).
  Afterwards every intended parameter must be among the names vLLM reports as loaded.
  Modules whose weights vLLM transforms after loading (fused-MoE re-layout, MLA's
  derived weights, quantized kernels) are reported in the layout so the coordinator
  refuses deltas that touch them before anything changes.
- reload (CPU repacks linear weights for oneDNN and leaves `layer.weight` empty):
  `reload_weights` re-materialises each touched layer, loads it and re-runs its
  post-load processing. The caller must send every shard of each touched fused module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from jlserve.engine.groups import fused_module_key
from jlserve.engine.loader import LOADED_ATTR
from jlserve.engine.wire import WirePatch, WireTensor, from_wire, patches_from_wire
from jlserve.faults import FaultStep, fault_point
from jlserve.vocab import ApplyPath


class JlserveWorkerExtension:
    """Methods added to vLLM's worker; `self` is the worker (model_runner, vllm_config)."""

    def jlserve_weight_layout(self) -> dict:
        """Which apply path this rank needs, and the model's fused-module map."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        quantized = self.vllm_config.model_config.quantization is not None  # type: ignore[attr-defined]
        repacked = any(p.numel() == 0 for p in model.parameters())
        path = ApplyPath.RELOAD if (quantized or repacked) else ApplyPath.IN_PLACE
        fused = getattr(model, "packed_modules_mapping", None) or {}
        parallel = self.vllm_config.parallel_config  # type: ignore[attr-defined]
        return {
            "apply_path": path.value,
            "fused_modules": {k: list(v) for k, v in fused.items()},
            "tensor_parallel_size": parallel.tensor_parallel_size,
            "data_parallel_size": parallel.data_parallel_size,
            "unsupported_modules": unsupported_modules(model, path),
        }

    def jlserve_loaded_fingerprint(self) -> str | None:
        """The model `--load-format jlserve` made at start (None: the base, or another
        loader)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return getattr(model, LOADED_ATTR, None)

    def jlserve_patch_weights(self, patches: dict[str, WirePatch]) -> dict:
        """Write sparse patches on this rank (in-place path). Returns `{"loaded": n}` or
        `{"error": message}` (reported, not raised; see `jlserve_load_weights`)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.checkpoint_weight_patch import (
            CheckpointWeightPatch,
            load_checkpoint_weight_patches,
        )

        try:
            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            decoded = patches_from_wire(patches)
            items = [
                CheckpointWeightPatch(name, p.shape, p.values.dtype, p.values, p.index)
                for name, p in decoded.items()
            ]
            half = len(items) // 2  # two loader calls, so a test fault can fire in between
            with set_current_vllm_config(self.vllm_config):  # type: ignore[attr-defined]
                loaded = load_checkpoint_weight_patches(model, items[:half])
                fault_point(FaultStep.MID_APPLY)
                loaded |= load_checkpoint_weight_patches(model, items[half:])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            fused = getattr(model, "packed_modules_mapping", None) or {}
            missing = not_loaded(decoded, loaded, fused)
            if missing:
                return {
                    "error": f"vLLM did not load {len(missing)} parameter(s), e.g. {missing[0]}"
                }
        except Exception as exc:  # reported to the coordinator, which restores the old values
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"loaded": len(decoded)}

    def jlserve_load_weights(self, tensors: dict[str, WireTensor], apply_path: str) -> dict:
        """Load full HF tensors on this rank.

        Returns `{"loaded": n}` or `{"error": message}`: a failure is reported, not
        raised, so the engine stays up and the coordinator can load the previous tensors.
        """
        from vllm.config import set_current_vllm_config

        try:
            weights = list(from_wire(tensors).items())
            if ApplyPath(apply_path) is ApplyPath.RELOAD:
                try:
                    self.reload_weights(weights_iterator=_midway_fault_point(weights))  # type: ignore[attr-defined]
                except Exception:
                    _finish_interrupted_reload(self.model_runner.get_model(), self.vllm_config)  # type: ignore[attr-defined]
                    raise
                _refresh_tied_modules(self.model_runner.get_model())  # type: ignore[attr-defined]
            else:
                with set_current_vllm_config(self.vllm_config), torch.no_grad():  # type: ignore[attr-defined]
                    self.model_runner.get_model().load_weights(_midway_fault_point(weights))  # type: ignore[attr-defined]
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
        except Exception as exc:  # reported to the coordinator, which restores the old weights
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"loaded": len(weights)}


def _midway_fault_point(
    weights: Sequence[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights`, passing the `mid_apply` fault point (tests only) once half were consumed,
    so an injected failure leaves the model half-updated, as a real one could."""
    for i, item in enumerate(weights):
        if i == len(weights) // 2:
            fault_point(FaultStep.MID_APPLY)
        yield item


def _finish_interrupted_reload(model: torch.nn.Module, vllm_config: object) -> None:
    """Leave vLLM's layerwise reload after a failure midway, so the model can run again.

    `reload_weights` first moves every layer to the meta device and rebuilds each one as
    its weights arrive; only its final step puts the kernel tensors back into the layers
    that received nothing. Without that step the model cannot run and a second reload
    (the coordinator restoring the previous weights) fails. Layers that were rebuilt
    midway hold new or partial values until the coordinator reloads their old tensors.
    """
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    finalize_layerwise_reload(model, vllm_config.model_config)  # type: ignore[attr-defined]


def _refresh_tied_modules(model: torch.nn.Module) -> None:
    """Re-run post-load processing of modules that share a parameter with another one.

    Tied embeddings: `lm_head.weight` is `embed_tokens.weight`. The reload path rewrites
    the shared tensor through `embed_tokens` only, but on CPU `lm_head` computes with its
    own packed copy made at load time, which would stay stale. Re-processing rebuilds it
    from the (updated) shared tensor.
    """
    owner: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            first = owner.setdefault(id(param), module)
            method = getattr(module, "quant_method", None)
            if first is not module and method is not None:
                method.process_weights_after_loading(module)


def not_loaded(
    names: Iterable[str], loaded: set[str], fused_modules: Mapping[str, Iterable[str]]
) -> list[str]:
    """The HF tensors among `names` whose vLLM parameter is not in `loaded` (the names
    `model.load_weights` reports, e.g. `...self_attn.qkv_proj.weight` for `q_proj`)."""
    missing = []
    for name in names:
        leaf = name.rpartition(".")[2]
        expected = f"{fused_module_key(name, fused_modules)}.{leaf}"
        if expected not in loaded and not any(n.endswith("." + expected) for n in loaded):
            missing.append(name)
    return sorted(missing)


def unsupported_modules(model: torch.nn.Module, path: ApplyPath) -> dict[str, str]:
    """vLLM modules whose weights `path` cannot update, with the reason (vLLM 0.32).

    After loading, vLLM re-lays out fused-MoE expert weights for its kernels, derives
    MLA's absorbed matrices from `kv_b_proj` into the attention layer, and packs
    quantized weights. The in-place path writes checkpoint values into parameters, so it
    would leave those stale. The reload path re-processes each touched layer, which
    covers quantized layers, but not MLA's derived weights (they live in the attention
    module, which holds no checkpoint tensor), nor an experts layer given some of its
    experts: seen on 0.32 CPU with a tiny Mixtral, the layer stayed unloaded ("weights
    were not loaded") and the model answered empty text.
    """
    from vllm.model_executor.layers.attention.mla_attention import MLAAttention
    from vllm.model_executor.layers.fused_moe import MoERunner, RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, MLAAttention) and id(module.kv_b_proj) in names:
            found[names[id(module.kv_b_proj)]] = (
                "MLA derives its absorbed attention matrices from kv_b_proj after loading"
            )
        if isinstance(module, MoERunner | RoutedExperts):
            found[name] = (
                "fused-MoE expert weights are re-laid out for the kernels after loading"
                if path is ApplyPath.IN_PLACE
                else "vLLM's reload rebuilds an experts layer only from all of its experts"
            )
        elif path is ApplyPath.IN_PLACE and isinstance(module, LinearBase | VocabParallelEmbedding):
            method = getattr(module, "quant_method", None)
            if method is not None and not isinstance(
                method, UnquantizedLinearMethod | UnquantizedEmbeddingMethod
            ):
                found[name] = f"weights are processed by {type(method).__name__} after loading"
    return found
