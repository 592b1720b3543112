"""ONNX_QUANTIZE=int8: fused graph, dynamic int8 weights, the worst MatMuls left in fp32,
and the quantization settings that are right for the CPU it runs on.

onnxruntime's transformer optimizer fuses attention, GELU and LayerNorm; then
``quantize_dynamic`` stores weights as int8 with one scale per output channel (one per
tensor loses too much accuracy) and quantizes activations per tensor at run time. That
activation scale is ruined by heavy tails: the inputs of BERT's feed-forward
down-projections reach 50-80x their RMS, so most values fall into a few int8 steps.
The tenth of the MatMuls whose inputs have the largest max/RMS ratio on probe texts
stays in fp32 (on all-MiniLM-L6-v2: 2 of 18, the first two layers' down-projections).

Which weights suit the CPU (``int8_profile``), after onnxruntime's own guidance for CPU
inference (the ``quantize_static`` docstring of onnxruntime.quantization, 1.31): x86
without VNNI multiplies uint8 activations by int8 weights with VPMADDUBSW, which adds
pairs of products into a saturating int16, so full-range weights can overflow; there
``reduce_range=True`` (7-bit weights) keeps every pair in range. x86 with VNNI
(AVX512-VNNI, AVX-VNNI; AMX cores have it too) and ARM accumulate in int32 and keep full
8-bit weights. Measured on all-MiniLM-L6-v2, worst probe cosine to fp32 (AVX2 emulated
as an EPYC-Rome under QEMU, whose onnxruntime kernels saturate exactly like the real
CPU's): AVX2 with 8-bit weights 0.990, with 7-bit weights 0.9925; VNNI 8-bit 0.9946.
The profile is part of the int8 file's cache name, so a shared ONNX_CACHE_DIR serves each
CPU its own file.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
ARM64 = frozenset({"aarch64", "arm64"})


@dataclass(frozen=True, slots=True)
class Int8Profile:
    name: str  # part of the cached file's name and of /health
    reduce_range: bool  # 7-bit weights: no int16 saturation in VPMADDUBSW (x86 without VNNI)
    why: str


def int8_profile(arch: str, cpu_flags: frozenset[str]) -> Int8Profile:
    """The weight settings for this CPU; an unknown CPU gets the ones that are safe everywhere."""
    arch = arch.lower()
    if arch in ARM64:
        return Int8Profile("arm64", False, "ARM64: int32 accumulation, full 8-bit weights")
    if arch in X86 and cpu_flags & VNNI_FLAGS:
        found = ", ".join(sorted(cpu_flags & VNNI_FLAGS))
        return Int8Profile("x86-vnni", False, f"x86 with VNNI ({found}): full 8-bit weights")
    if arch in X86:
        return Int8Profile(
            "x86-no-vnni", True, "x86 without VNNI: 7-bit weights (reduce_range) against int16 saturation"
        )
    return Int8Profile("generic", True, f"{arch or 'unknown'} CPU: 7-bit weights (reduce_range), safe on any")


def quantize_int8(
    fp32: Path, target: Path, torch_model: object, probes: dict[str, np.ndarray], profile: Int8Profile
) -> None:
    """Write the int8 model of ``fp32`` to ``target``; ``probes`` are collated probe inputs."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    heads, hidden = attention_shape(torch_model)
    source = fp32
    with tempfile.TemporaryDirectory() as work:
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            optimized = Path(work) / "optimized.onnx"
            fused = optimize_model(str(fp32), model_type="bert", num_heads=heads, hidden_size=hidden)
            fused.save_model_to_file(str(optimized))
            source = optimized
        except Exception as exc:  # noqa: BLE001 - an unfusable architecture is still quantizable
            log.warning("onnxruntime's optimizer could not fuse this model (%s); quantizing as is", exc)
        kept = worst_outlier_matmuls(onnx.load(str(source)), probes)
        log.info("int8: keeping %s in fp32 (their inputs have the largest outliers)", kept or "nothing")
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=profile.reduce_range,
            nodes_to_exclude=kept,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # fused ops lack shape info
        )


KEEP_FP32_FRACTION = 0.1


def worst_outlier_matmuls(model: object, probes: dict[str, np.ndarray]) -> list[str]:
    """The tenth of the MatMuls whose inputs, on the probes' real tokens, have the largest max|x| / RMS."""
    import onnx
    import onnxruntime as ort

    graph = model.graph  # type: ignore[attr-defined]
    matmuls = {node.name: node.input[0] for node in graph.node if node.op_type == "MatMul" and node.name}
    if not matmuls:
        return []
    known = {output.name for output in graph.output}
    for tensor in set(matmuls.values()) - known:
        graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    feeds = {i.name: probes[i.name] for i in session.get_inputs()}
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds), strict=True))
    real = probes["attention_mask"].astype(bool)

    def ratio(tensor: str) -> float:
        x = np.asarray(values[tensor])
        x = x[real] if x.shape[:2] == real.shape else x.reshape(-1)
        return float(np.abs(x).max() / max(np.sqrt(np.mean(np.square(x))), 1e-12))

    keep = max(1, round(len(matmuls) * KEEP_FP32_FRACTION))
    return sorted(matmuls, key=lambda name: ratio(matmuls[name]), reverse=True)[:keep]


def attention_shape(model: object) -> tuple[int, int]:
    """(attention heads, hidden size) of the transformer, for the optimizer; (0, 0) lets it guess."""
    for module in model.modules():  # type: ignore[attr-defined]
        config = getattr(module, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if heads and hidden:
            return int(heads), int(hidden)
    return 0, 0
