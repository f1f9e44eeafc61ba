"""The encoders' numeric precisions (`IPDFER_PRECISION`), in a module without torch:
the service's settings validate against it before any model loads. What each one
means and where it runs: `model.inference.resolve_precision`."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 / AMX), as oneDNN sees
    it: bf16 training autocast and `IPDFER_PRECISION=bf16` need it (torch imported
    here, on the first call)."""
    import torch
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
