"""Third-party noise off for the command line: warnings and bars that tell a user nothing they
can act on. Each is named here, with where it came from, so a new one is added the same way.
"""

from __future__ import annotations

import logging
import os

# onnxruntime.quantization logs this through the root logger once per quantized graph (21
# times in one quickstart): its pre-processing is for vision graphs' shape inference.
_ORT_HINT = "pre-processing before quantization"  # "Please consider (to run) pre-processing before ..."


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):  # substrings
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in str(record.msg) for p in self.prefixes)


def quiet_third_party() -> None:
    # transformers' and huggingface_hub's weight-loading bars (read when they are imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # torch.onnx's exporter: "torchvision is not installed. Skipping torchvision::nms" x4
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    root = logging.getLogger()
    if not any(isinstance(f, _DropMessages) for f in root.filters):
        root.addFilter(_DropMessages((_ORT_HINT,)))
