"""The encoders' numeric precisions (`IPDFER_PRECISION`), in a module without torch:
the service's settings validate against it before any model loads. What each one
means and where it runs: `model.inference.resolve_precision`."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
