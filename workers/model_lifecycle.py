"""What every model worker does the same way: find its weights offline, pick device and dtype, load once and
lazily (timed apart from the work), and run batches that back off on CUDA out-of-memory.

Heavy libraries (torch ~3.5 s to import, diffusers, transformers) are imported inside functions, never at
module level: the instruct stage and the run report build workers only to ask what they cover.
Weights load through the libraries' own `from_pretrained` with safetensors only (no pickle from a model
folder); a hub id is read from the local Hugging Face cache and never downloaded at run time, so a run is
reproducible and a worker on a node without network fails at once with the folder it looked in.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, ClassVar, Generic, TypeVar

from manifests.rejected import ItemFailed

log = logging.getLogger(__name__)
T, R = TypeVar("T"), TypeVar("R")
DTYPES = ("float32", "bfloat16", "float16")


def need(module: str) -> ModuleType:
    """Import a heavy library at first use; a missing one says which install brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"model workers need {module!r}, which is not installed "
                          "(pyproject's train extra installs torch, diffusers and transformers)") from e


class ModelNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the folder from_pretrained reads
    model: str  # as the recipe names it
    revision: str | None  # the cached snapshot's commit for a hub id; None for a plain folder


TINY_SCHEME = "tiny:"


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """A local folder as is, or a hub id (at `revision`: branch, tag or commit) from the local cache only, or
    `tiny:<name>`: a tiny random-weight checkpoint of a real model family, built into a cache folder at first
    use (workers/tiny_models.py) and then read like any folder, for CPU runs and tests."""
    if model.startswith(TINY_SCHEME):
        from workers.tiny_models import build_tiny

        return ModelSource(build_tiny(model[len(TINY_SCHEME):]), model, "random-weights")
    folder = Path(model).expanduser()
    if folder.is_dir():
        return ModelSource(folder, model, None)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(model, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotFound(
            f"model {model!r}{at} is neither a folder nor in the local Hugging Face cache {constants.HF_HUB_CACHE} "
            f"(workers never download: fetch it beforehand with `hf download {model}`, or name a folder)") from e
    return ModelSource(path, model, path.name)  # .../snapshots/<commit>


DEVICES = ("auto", "cpu", "cuda")


def pick_device(requested: str = "auto") -> str:
    """The GPU Ray assigned this actor (it sets CUDA_VISIBLE_DEVICES, so it is always cuda:0), else the CPU;
    a recipe may pin a worker to "cpu" (a light model beside a GPU editor), or to "cuda", which then fails
    at load on an actor without a GPU instead of running on its CPU unnoticed."""
    if requested not in DEVICES:
        raise ValueError(f"device {requested!r} is not one of {DEVICES}")
    torch = need("torch")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested, but this actor sees no GPU (give its stage num_gpus)")
    return requested


def torch_dtype(name: str, device: str):
    """The recipe's dtype; half precision on CPU falls back to float32 with a warning, not an error: the CPU
    path exists for tiny models and debugging, where bf16 is emulated (slower than fp32 without AMX) and fp16
    lacks CPU kernels for some ops, and a GPU recipe should run unchanged on a laptop. Provenance records the
    dtype actually used."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {DTYPES}")
    if device == "cpu" and name != "float32":
        log.warning("dtype %s requested on CPU: running in float32", name)
        name = "float32"
    return getattr(need("torch"), name)


class LazyModel(Generic[T]):
    """A model built by `load` on first `get()`, once; `load_seconds` keeps its load time apart from the work.
    A load that fails raises the same error on every later `get()` without trying again: the stage retries a
    failed batch pair by pair, and a missing or broken checkpoint must not be read once per pair."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self._error: Exception | None = None
        self.model: T | None = None  # None until loaded
        self.load_seconds: float | None = None

    def get(self) -> T:
        if self._error is not None:
            raise self._error
        if self.model is None:
            start = time.perf_counter()
            try:
                self.model = self._load()
            except Exception as e:
                self._error = e
                raise
            self.load_seconds = time.perf_counter() - start
        return self.model


def run_batched(fn: Callable[[list[T]], list[R]], items: list[T], batch_size: int) -> list[R | ItemFailed]:
    """`fn` over `items` in batches of up to `batch_size`, one result per item, in order. On CUDA out-of-memory
    the batch is halved and retried (the smaller size holds for the rest of this call); an item that still runs
    out of memory alone comes back as `ItemFailed("oom")`. Other exceptions propagate."""
    torch = need("torch")
    out: list[R | ItemFailed] = []
    size, i = batch_size, 0
    while i < len(items):
        chunk = items[i:i + size]
        try:
            results = fn(chunk)
        except torch.OutOfMemoryError as e:
            error = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        else:
            out.extend(results)
            i += len(chunk)
            continue
        # Outside the except block: the traceback's frames (holding the batch's activations) are gone.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(chunk) == 1:
            out.append(ItemFailed("oom", f"{error} (batch of 1)"))
            i += 1
        else:
            size = len(chunk) // 2
            log.warning("out of memory at batch %d: retrying at %d", len(chunk), size)
    return out


def library_versions(*names: str) -> dict[str, str | None]:
    """Installed versions, read from package metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found



def diffusers_pipeline(class_name: str, source: ModelSource, dtype: str, **components):
    """A diffusers pipeline from its folder on the actor's device in the recipe's dtype, weights as safetensors,
    progress bars off (one per call would flood the actor's log); `components` replace loaded ones."""
    device = pick_device()
    pipe = getattr(need("diffusers"), class_name).from_pretrained(
        source.path, dtype=torch_dtype(dtype, device), use_safetensors=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class TransformersPair:
    """A transformers model and its processor, by hub id or folder, loaded once on first use (`pair()`), on
    the actor's device (or the recipe's, `pick_device`) in the recipe's dtype, weights as safetensors. Subclasses name the two classes and may
    extend `_load` (e.g. to precompute embeddings) and `provenance`."""

    model_class: ClassVar[str]  # e.g. "Sam2Model"
    processor_class: ClassVar[str]  # e.g. "Sam2Processor"

    def __init__(self, model: str, revision: str | None, dtype: str, device: str = "auto") -> None:
        """Loads nothing."""
        self.model_name, self.revision, self.dtype, self.device = model, revision, dtype, device
        self._source: ModelSource | None = None
        self._model = LazyModel(self._load)

    def _load(self) -> tuple:
        transformers = need("transformers")
        self._source = resolve_model(self.model_name, self.revision)
        device = pick_device(self.device)
        model = getattr(transformers, self.model_class).from_pretrained(
            self._source.path, dtype=torch_dtype(self.dtype, device), use_safetensors=True)
        processor = getattr(transformers, self.processor_class).from_pretrained(self._source.path)
        return model.to(device).eval(), processor

    def pair(self) -> tuple:
        return self._model.get()

    @property
    def load_seconds(self) -> float | None:
        return self._model.load_seconds

    def provenance(self) -> dict:
        """Model, resolved revision, and the dtype and device really used (the recipe's until it loads)."""
        loaded = self._model.model
        return {"model": self.model_name, "revision": (self._source and self._source.revision) or self.revision,
                "dtype": str(loaded[0].dtype).removeprefix("torch.") if loaded else self.dtype,
                "device": loaded[0].device.type if loaded else None}
