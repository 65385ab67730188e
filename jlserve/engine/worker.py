"""Worker extension: the code that changes weights inside every vLLM worker (each TP rank).

vLLM mixes this class into its worker class (`--worker-extension-cls`), so its methods
run on every rank through `collective_rpc("jlserve_...")`. Arguments arrive by msgpack
(str-keyed dicts of CPU tensors). Both apply paths hand the full HF tensors to vLLM's own
weight loaders, which know each layer's fused shards and tensor-parallel slice
(`output_sizes`, `tp_rank`, `num_kv_head_replicas`, ...), so names and TP offsets are
never re-derived here:

- in place (dense, unquantized parameters, e.g. GPU): `model.load_weights` copies each
  rank's slice into the existing parameter storage, which CUDA graphs keep pointing at.
- reload (CPU repacks linear weights for oneDNN and leaves `layer.weight` empty):
  `reload_weights` re-materialises each touched layer, loads it and re-runs its
  post-load processing. The caller must send every shard of each touched fused module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from jlserve.engine.wire import WireTensor, from_wire
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
        return {
            "apply_path": path.value,
            "fused_modules": {k: list(v) for k, v in fused.items()},
            "tensor_parallel_size": self.vllm_config.parallel_config.tensor_parallel_size,  # type: ignore[attr-defined]
        }

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
