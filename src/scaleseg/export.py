"""Export a trained checkpoint for serving: ONNX (the whole predictor) and safetensors (the weights).

ONNX: one graph from a normalised image to class ids,

    image  float32 (B, 3, H, W), RGB, (pixel - mean) / std with pixel in 0..255 (`to_tensor`)
    labels int64   (B, H, W) class ids

with B, H and W dynamic. It is the model's own `predict` (what `scaleseg eval` runs for the whole
image at scale 1 without flip), traced. With the embedding scorer the nearest-class search
(`scaleseg.search.nearest_class`) is inside the graph and never builds a C x H x W tensor: it walks
the class table in fixed chunks of classes (their number is static, C is fixed at export) with a
running best distance and index; ties go to the lower class id. A JSON
sidecar (same stem) records the normalisation, the classes, the layouts and where the model came from.

safetensors: the model's state dict and a JSON sidecar with the checkpoint's config;
`load_safetensors_model` rebuilds the model from them without `torch.load`.

The optional packages come with `pip install 'scaleseg[export]'`; they are imported only here.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

import scaleseg
from scaleseg.engine.checkpoint import load_checkpoint_model
from scaleseg.errors import CheckpointError, ScalesegError

DEFAULT_CHUNK_CLASSES = 1024
INPUT_NAME, OUTPUT_NAME = "image", "labels"
EXAMPLE_SIZE = (64, 64)  # (H, W) of the image traced at export; the graph takes any size
VERIFY_SHAPES = ((1, 96, 80), (2, 80, 96))  # (B, H, W) checked against PyTorch, unlike the example
MIN_AGREEMENT = 0.999  # fraction of pixels whose ONNX and PyTorch labels must agree
INSTALL_HINT = "pip install 'scaleseg[export]'"


def _require(module: str, purpose: str):
    """Import an optional package of the `export` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ScalesegError(f"{purpose} needs the {module!r} package, which is not installed: {INSTALL_HINT}") from None


class ExportablePredictor(nn.Module):
    """image (B, 3, H, W) normalised -> labels (B, H, W) int64: `model.predict` (whole image, scale 1, no
    flip), the very code `scaleseg eval` runs, with the embedding scorer's nearest-class search walking
    the class table in `chunk_classes`-wide chunks (peak memory B*H*W*chunk_classes*4 bytes, not C*H*W*4;
    ties go to the lower class id, as in eval). Every function on the way is traceable with dynamic B, H
    and W (the pyramid's padding, pooling and cell upsampling included), so nothing is swapped in."""

    def __init__(self, model: nn.Module, chunk_classes: int = DEFAULT_CHUNK_CLASSES) -> None:
        super().__init__()
        if chunk_classes < 1:
            raise ScalesegError(
                f"chunk_classes = {chunk_classes}: must be >= 1 (classes per step of the nearest-class search)"
            )
        self.model = model.eval()
        self.chunk_classes = int(chunk_classes)
        table = model.head.class_table()
        self.num_classes = None if table is None else int(table.shape[0])  # None: no class table to search

    @property
    def num_chunks(self) -> int | None:
        """Steps of the nearest-class search in the graph; None without a class table."""
        return None if self.num_classes is None else -(-self.num_classes // self.chunk_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.predict(image, chunk_classes=self.chunk_classes)


# ---------------------------------------------------------------------------------------------
# the checkpoint's classes and the output paths


def _class_meta(ckpt: dict) -> dict:
    num_classes = int(ckpt["num_classes"])
    palette = ckpt.get("palette")
    return {
        "num_classes": num_classes,
        "class_names": list(ckpt.get("class_names") or [str(i) for i in range(num_classes)]),
        "ignore_index": int(ckpt["ignore_index"]),
        "palette": np.asarray(palette, dtype=np.int64).tolist() if palette is not None else None,  # (C, 3) RGB
    }


def _default_out(checkpoint: str | Path, out: str | Path | None, suffix: str) -> Path:
    path = Path(out) if out else Path(checkpoint).with_suffix(suffix)
    if path.suffix != suffix:
        raise ScalesegError(f"--out {str(path)!r}: the {suffix[1:]} file must end in {suffix} (its sidecar is <stem>.json)")
    if path.is_dir():
        raise ScalesegError(f"--out {str(path)!r} is a folder; give the file to write, e.g. {path / ('model' + suffix)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _dumps(value: Any, indent: int = 0) -> str:
    """JSON with objects and lists of lists indented, lists of plain values on one line (palette rows)."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        return "[\n" + ",\n".join(pad + _dumps(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value)


def _check_sidecar(path: Path, kind: str) -> Path:
    """The JSON sidecar <stem>.json of `path`; refuses to replace a file that is not a `kind` sidecar
    (e.g. the other format's, when both are exported beside one checkpoint)."""
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            found = json.loads(sidecar.read_text(encoding="utf-8")).get("format")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            found = None
        if found != kind:
            what = f"the sidecar of a {found} export" if str(found).startswith("scaleseg-") else "not a scaleseg sidecar"
            raise ScalesegError(
                f"{str(sidecar)!r} exists and is {what}; it would be overwritten by this export's sidecar. "
                f"Pass --out with another name, e.g. {path.with_name(path.stem + '-' + kind.split('-')[-1] + path.suffix)}"
            )
    return sidecar


def _write_json(path: Path, data: dict) -> None:
    from scaleseg.data.io import write_text_atomic

    write_text_atomic(path, _dumps(data) + "\n")


# ---------------------------------------------------------------------------------------------
# ONNX


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and warnings (e.g. torchvision not installed)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def random_images(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Random RGB uint8 images of (B, H, W), normalised as `to_tensor`: float32 (B, 3, H, W)."""
    from scaleseg.data.transforms import to_tensor

    rng = np.random.default_rng(seed)
    B, H, W = shape
    return torch.stack([to_tensor(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(B)])


def export_onnx_file(predictor: ExportablePredictor, path: str | Path, example_size: tuple[int, int] = EXAMPLE_SIZE) -> dict:
    """Trace `predictor` at a (2, 3, *example_size) image and write the ONNX graph to `path` (not
    atomically: `export_onnx` writes to a temporary name, verifies, then renames). -> export facts."""
    _require("onnxscript", "ONNX export (torch.onnx.export with dynamo=True)")
    _require("onnx", "ONNX export")
    example = random_images((2, *example_size))  # batch 2: a batch of 1 would be specialised to 1
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}}
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                predictor, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic, dynamo=True, verbose=False,
            )
            program.save(str(path), external_data=False)
    except ScalesegError:
        raise
    except Exception as exc:  # the exporter raises many types; its first line says what failed
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ScalesegError(
            f"torch.onnx.export (dynamo, torch {torch.__version__}) could not export this model: "
            f"{type(exc).__name__}: {first[:400]}"
        ) from exc
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"exporter": "torch.onnx.export(dynamo=True)", "opset": opset, "torch": torch.__version__,
            "example_shape": [2, 3, *example_size]}


def verify_onnx(
    path: str | Path, predictor: ExportablePredictor, shapes=VERIFY_SHAPES, min_agreement: float = MIN_AGREEMENT
) -> dict:
    """Run the ONNX file with onnxruntime (CPU) on random normalised images of `shapes` (B, H, W) and
    compare with the PyTorch predictor. -> {"agreement": fraction of equal pixels, ...}; raises a
    ScalesegError below `min_agreement` or on a wrong output shape or dtype."""
    ort = _require("onnxruntime", "verifying the ONNX file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise ScalesegError(f"onnxruntime cannot load the exported graph ({type(exc).__name__}: {exc}); the file "
                            "was not written") from None
    equal = total = 0
    for i, shape in enumerate(shapes):
        images = random_images(tuple(shape), seed=1 + i)
        try:
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        except Exception as exc:
            raise ScalesegError(
                f"ONNX verification failed: onnxruntime cannot run the graph on an image of {list(images.shape)} "
                f"({type(exc).__name__}: {str(exc).strip()[:300]}); the file was not written"
            ) from None
        with torch.no_grad():
            want = predictor(images).numpy()
        if got.shape != want.shape or got.dtype != np.int64:
            raise ScalesegError(
                f"ONNX verification of {str(path)!r} failed: input {list(images.shape)} gave labels "
                f"{list(got.shape)} {got.dtype}, PyTorch {list(want.shape)} int64"
            )
        equal += int((got == want).sum())
        total += want.size
    agreement = equal / total
    if agreement < min_agreement:
        raise ScalesegError(
            f"ONNX verification failed: onnxruntime and PyTorch agree on {agreement:.4%} of the pixels "
            f"(need {min_agreement:.1%}) on images of {[list(s) for s in shapes]} (B, H, W); the file was not "
            "written. Report it with the model config; --no-verify writes it anyway"
        )
    return {"agreement": agreement, "shapes": [list(s) for s in shapes], "pixels": total,
            "runtime": f"onnxruntime {ort.__version__}"}


def onnx_sidecar(ckpt: dict, checkpoint: str | Path, facts: dict) -> dict:
    """The JSON written beside the .onnx file: what a server needs besides the graph."""
    from scaleseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return {
        "format": "scaleseg-onnx",
        "scaleseg_version": scaleseg.__version__,
        **_class_meta(ckpt),
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, "height", "width"],
            "channel_order": "RGB",
            "normalization": {
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "pixel_range": [0, 255],
                "formula": "(pixel - mean) / std per channel, pixel the uint8 RGB value as float",
            },
        },
        "output": {
            "name": OUTPUT_NAME, "dtype": "int64", "layout": "NHW", "shape": ["batch", "height", "width"],
            "values": "class ids 0..num_classes-1 (ignore_index is never predicted)",
        },
        "prediction": {"mode": "whole", "scales": [1.0], "flip": False},
        "model": ckpt["config"].get("model"),
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "iteration": ckpt.get("iteration")},
        "export": facts,
    }


def export_onnx(
    checkpoint: str | Path,
    out: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    chunk_classes: int = DEFAULT_CHUNK_CLASSES,
    verify: bool = True,
    example_size: tuple[int, int] = EXAMPLE_SIZE,
    verify_shapes=VERIFY_SHAPES,
) -> dict:
    """Checkpoint -> <out>.onnx (verified against PyTorch unless `verify=False`) and <out>.json.
    -> {"onnx": path, "sidecar": path, "verification": {...} or None}."""
    from scaleseg.data.io import atomic_write

    for module in ("onnxscript", "onnx") + (("onnxruntime",) if verify else ()):
        _require(module, "scaleseg export --format onnx")
    path = _default_out(checkpoint, out, ".onnx")
    sidecar = _check_sidecar(path, "scaleseg-onnx")
    model, ckpt, _ = load_checkpoint_model(checkpoint, overrides)
    predictor = ExportablePredictor(model, chunk_classes).eval()
    facts: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        facts.update(export_onnx_file(predictor, tmp, example_size))
        facts["verification"] = verify_onnx(tmp, predictor, verify_shapes) if verify else None

    atomic_write(path, write)
    if predictor.num_chunks is not None:
        facts["chunk_classes"] = predictor.chunk_classes
        facts["chunks"] = predictor.num_chunks
    _write_json(sidecar, onnx_sidecar(ckpt, checkpoint, facts))
    return {"onnx": path, "sidecar": sidecar, "verification": facts["verification"], "export": facts}


# ---------------------------------------------------------------------------------------------
# safetensors


def export_safetensors(
    checkpoint: str | Path, out: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict:
    """Checkpoint -> <out>.safetensors (every state-dict tensor, contiguous, on the CPU) and <out>.json
    (the full config and the classes). -> {"safetensors": path, "sidecar": path, "tensors": count}."""
    from scaleseg.data.io import atomic_write

    st = _require("safetensors.torch", "scaleseg export --format safetensors")
    path = _default_out(checkpoint, out, ".safetensors")
    sidecar = _check_sidecar(path, "scaleseg-safetensors")
    model, ckpt, cfg = load_checkpoint_model(checkpoint, overrides)
    # a copy of each tensor: the pyramid's levels share one class table, and safetensors stores no aliases
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    config = cfg.to_dict()

    def write(tmp: Path) -> None:
        st.save_file(state, str(tmp), metadata={"format": "scaleseg-safetensors"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # save_file creates the file private (0600); give it the usual mode

    atomic_write(path, write)
    _write_json(sidecar, {
        "format": "scaleseg-safetensors",
        "scaleseg_version": scaleseg.__version__,
        **_class_meta(ckpt),
        "config": config,
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "iteration": ckpt.get("iteration")},
    })
    return {"safetensors": path, "sidecar": sidecar, "tensors": len(state)}


def load_safetensors_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model from `scaleseg export --format safetensors` output: <stem>.safetensors and
    <stem>.json beside it. -> (model in eval mode on the CPU, the sidecar dict). Strict: every weight
    must be in the file, with its shape. Needs no `torch.load` (no pickle)."""
    from scaleseg.engine.checkpoint import config_from_checkpoint, model_from_checkpoint

    st = _require("safetensors.torch", "load_safetensors_model")
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    sidecar = path.with_suffix(".json")
    for p in (path, sidecar):
        if not p.is_file():
            raise CheckpointError(f"{str(p)!r} does not exist; `scaleseg export CKPT --format safetensors` writes "
                                  "<stem>.safetensors and <stem>.json side by side")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(sidecar)!r} is not readable JSON ({exc}); export the checkpoint again") from None
    missing = [k for k in ("config", "num_classes", "ignore_index") if k not in meta]
    if not isinstance(meta, dict) or missing or meta.get("format") != "scaleseg-safetensors":
        raise CheckpointError(f"{str(sidecar)!r} is not a scaleseg safetensors sidecar (missing {missing or 'format'}); "
                              "export the checkpoint again")
    try:
        state = st.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{str(path)!r} cannot be read as safetensors ({exc}); it is corrupt or truncated") from None
    as_checkpoint = {"model": state, "config": meta["config"], "num_classes": meta["num_classes"],
                     "ignore_index": meta["ignore_index"]}
    return model_from_checkpoint(config_from_checkpoint(as_checkpoint), as_checkpoint, path), meta
