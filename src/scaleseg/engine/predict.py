"""`scaleseg predict`: label maps and colour overlays for an image or a folder of images.

Images are read by `workers` processes; consecutive images of one size are predicted together, up
to `batch_size` (in eval mode every image of a batch is predicted independently of the others);
outputs are written by a background thread as batches finish. A file that cannot be read or
predicted is listed at the end and in OUT/failures.txt, and does not stop the others.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from scaleseg.engine import inference
from scaleseg.errors import ScalesegError


class _ImageReader:
    """Map-style dataset for a DataLoader: item i -> (i, uint8 image (H, W, 3) or None, None or the reason
    the file could not be read), so one unreadable image is reported instead of ending the run."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from scaleseg.data.io import read_image

        try:
            return index, read_image(self.files[index]), None
        except Exception as exc:  # noqa: BLE001 - any reader failure is this file's, reported with its path
            return index, None, str(exc) if isinstance(exc, ScalesegError) else f"{type(exc).__name__}: {exc}"


def output_names(files: list[Path], inputs: Path, out: Path, suffix: str) -> dict[Path, Path]:
    """Input image -> its label map path under `out` (the overlay is `<label map without suffix>_overlay.png`).

    OUT/<relative path without the suffix><suffix>, e.g. a/photo.jpg -> OUT/a/photo.png; an input whose
    outputs would be written over an input file (`--out` = the input folder) or over another input's
    outputs (photo.jpg and photo.png; x.png and x_overlay.png) keeps its extension in the name instead:
    a/photo.jpg.png. Anything still colliding is refused before a file is written."""
    def outputs(path: Path, keep_extension: bool) -> tuple[Path, Path]:
        rel = path.relative_to(inputs) if inputs.is_dir() else Path(path.name)
        base = out / rel.parent / (rel.name if keep_extension else rel.stem)
        return base.with_name(base.name + suffix), base.with_name(base.name + "_overlay.png")

    inputs_resolved = {p.resolve() for p in files}
    keep: set[Path] = set()
    for _ in range(3):  # at most two rounds of renaming are ever needed
        planned = {p: outputs(p, p in keep) for p in files}
        users: dict[Path, list[Path]] = {}
        for path, pair in planned.items():
            for target in pair:
                users.setdefault(target.resolve(), []).append(path)
        clashes = {p for target, using in users.items() for p in using if len(using) > 1 or target in inputs_resolved}
        if not clashes:
            return {p: pair[0] for p, pair in planned.items()}
        if clashes <= keep:
            break
        keep |= clashes
    shown = ", ".join(str(p) for p in sorted(clashes)[:4])
    raise ScalesegError(
        f"the outputs of {shown} would overwrite an input or each other even with the extension kept in their "
        "names; rename those files or choose another --out folder"
    )


def _write_prediction(target: Path, image, label, num_classes: int, palette) -> str | None:
    """Label map at `target` (lossless, see `save_label_map`) and colour overlay beside it; -> None, or why not."""
    from PIL import Image

    from scaleseg.data.io import overlay, save_label_map

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_label_map(target, label, num_classes)
        Image.fromarray(overlay(image, label, palette)).save(target.with_name(target.name[: -len(target.suffix)] + "_overlay.png"))
    except (OSError, ValueError) as exc:
        return f"cannot write {target}: {exc}"
    return None


@dataclass
class PredictReport:
    files: list[Path]
    out: Path
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (file, why), sorted by file

    @property
    def listing(self) -> Path:
        return self.out / "failures.txt"


def predict_files(
    checkpoint: str | Path,
    inputs: str | Path,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    batch_size: int = 8,
    workers: int = 2,
    progress: bool = True,
) -> PredictReport:
    """Predict every image of `inputs` (a file or a folder, searched recursively) with the checkpoint's
    model and `eval` settings (overrides e.g. eval.mode=slide); write OUT/<relative path>.png (the label
    map; see `output_names`: never over an input, never two outputs on one name) and <...>_overlay.png, and
    OUT/failures.txt when anything failed."""
    from scaleseg.data.io import list_images, write_text_atomic
    from scaleseg.data.transforms import to_tensor
    from scaleseg.engine.checkpoint import load_checkpoint_model
    from scaleseg.engine.runtime import select_device
    from scaleseg.engine.workdir import check_writable

    if batch_size < 1:
        raise ScalesegError(f"--batch-size {batch_size}: must be >= 1")
    if workers < 0:
        raise ScalesegError(f"--workers {workers}: must be >= 0 (0 reads in the main process)")
    model, ckpt, cfg = load_checkpoint_model(checkpoint, overrides)
    num_classes, palette = int(ckpt["num_classes"]), ckpt["palette"].numpy()
    device = select_device(cfg.train.device)
    model.to(device)
    inputs = Path(inputs)
    files = list_images(inputs)
    out = Path(out)
    check_writable(out, "the output folder")
    targets = output_names(files, inputs, out, ".png" if num_classes <= 65536 else ".tif")
    report = PredictReport(files, out)
    failures = report.failures
    writes: list = []  # (path, future of _write_prediction)

    def target_of(path: Path) -> Path:
        return targets[path]

    def collect(keep: int) -> None:
        """Record finished writes; wait for the oldest until at most `keep` are outstanding."""
        while writes and (len(writes) > keep or writes[0][1].done()):
            path, future = writes.pop(0)
            error = future.result()
            if error:
                failures.append((path, error))

    def predict(batch: list[tuple[Path, object]]) -> list[tuple[Path, object, object]]:
        """[(path, image)] of one size -> [(path, image, labels (H, W))]; a batch that fails is retried
        one image at a time, so only the images that fail alone are reported."""
        try:
            images = torch.stack([to_tensor(image) for _, image in batch]).to(device)
            with torch.inference_mode():
                labels = inference.predict_labels(model, images, cfg.eval).cpu().numpy()
            return [(path, image, label) for (path, image), label in zip(batch, labels)]
        except (RuntimeError, ScalesegError) as exc:
            if len(batch) > 1:
                return [done for item in batch for done in predict([item])]
            first = (str(exc).strip().splitlines() or [""])[0]
            failures.append((batch[0][0], f"prediction failed: {type(exc).__name__}: {first}"))
            return []

    reader = DataLoader(_ImageReader(files), batch_size=None, shuffle=False, num_workers=workers if len(files) > 1 else 0)
    from scaleseg.engine.runtime import show_progress

    with ThreadPoolExecutor(max_workers=1) as writer, tqdm(
        total=len(files), desc="predict", unit="img", disable=not show_progress(progress) or len(files) == 1
    ) as bar:

        def flush(batch: list) -> None:
            for path, image, label in predict(batch):
                writes.append((path, writer.submit(_write_prediction, target_of(path), image, label, num_classes, palette)))
            bar.update(len(batch))
            collect(keep=2 * batch_size)  # bounded: finished images wait in memory for the writer

        pending: list = []
        for index, image, error in reader:
            path = files[index]
            if error is not None:
                failures.append((path, error))
                tqdm.write(f"skipped {path}: {error}")
                bar.update(1)
                continue
            image = image.numpy() if isinstance(image, torch.Tensor) else image  # the loader converts arrays
            if pending and (image.shape != pending[0][1].shape or len(pending) >= batch_size):
                flush(pending)
                pending = []
            pending.append((path, image))
        if pending:
            flush(pending)
        collect(keep=0)
    failures.sort(key=lambda f: str(f[0]))
    if failures:
        write_text_atomic(report.listing, "".join(f"{p}\t{' '.join(m.split())}\n" for p, m in failures))
    elif report.listing.is_file():
        report.listing.unlink()  # from an earlier run: nothing failed this time
    return report
