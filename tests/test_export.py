"""`scaleseg export`: the ONNX predictor (parity with PyTorch and between PyTorch forms), its sidecar,
safetensors round trips and the error cases. Each ONNX export takes a few seconds, so there are three."""

import json
import sys

import numpy as np
import pytest
import torch

from scaleseg.cli import main
from scaleseg.config import EvalConfig, load_config
from scaleseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from scaleseg.engine.checkpoint import save_checkpoint
from scaleseg.engine.inference import predict_labels
from scaleseg.errors import CheckpointError, ScalesegError
from scaleseg.export import (
    ExportablePredictor,
    export_onnx,
    export_safetensors,
    load_checkpoint_model,
    load_safetensors_model,
    random_images,
    verify_onnx,
)
from scaleseg.losses.pyramid import upsample_cells
from scaleseg.models import build_model
from scaleseg.models.heads.pyramid import pyramid_pool
from scaleseg.search import nearest_class

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("safetensors")

SMALL = ["model.decoder.channels=16", "model.decoder.low_level_channels=8"]
# a two-level pyramid with a small context module: the full four-level head exports too, in ~30 s
SMALL_PYRAMID = [*SMALL, "model.head.structure=pyramid", "model.head.pyramid.strides=[8,4]",
                 "model.head.pyramid.context_bins=[1,2]", "model.head.pyramid.semantic_channels=16",
                 "model.head.pyramid.unity_channels=8", "model.head.pyramid.tau=0.5"]


def train_tiny(work, *overrides):
    from tests.conftest import TINY

    base = [o for o in TINY if not o.startswith(("train.iters", "train.checkpoint"))]
    assert main(["train", *base, "train.iters=2", "train.checkpoint_interval=2", *overrides, "--work-dir", str(work)]) == 0
    return work / "iter_000002.pth"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two-iteration runs (BatchNorm statistics are no longer the initial ones): linear and embedding scorer."""
    root = tmp_path_factory.mktemp("export")
    return {"linear": train_tiny(root / "linear"), "embedding": train_tiny(root / "embedding", "model.head.scorer=embedding")}


@pytest.fixture(scope="module")
def linear_onnx(checkpoints, tmp_path_factory):
    """`scaleseg export CKPT --format onnx --out .../seg.onnx` of the linear run -> (path, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("served") / "sub" / "seg.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(checkpoints["linear"]), "--format", "onnx", "--out", str(out)]) == 0
    return out, printed.getvalue()


def random_model(overrides, num_classes=40, seed=0):
    """A model with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(load_config(None, overrides).model, num_classes, 255)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_model_checkpoint(model, overrides, path, num_classes=40):
    rng = np.random.default_rng(0)
    save_checkpoint({
        "iteration": 7, "model": model.state_dict(),
        "config": load_config(None, [*overrides, f"data.num_classes={num_classes}"]).to_dict(),
        "num_classes": num_classes, "ignore_index": 255, "class_names": [f"class{i}" for i in range(num_classes)],
        "palette": torch.as_tensor(rng.integers(0, 256, (num_classes, 3), dtype=np.uint8)),
    }, path)
    return path


def onnx_labels(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["labels"], {"image": images.numpy()})[0]


def torch_labels(model, images):
    with torch.no_grad():
        return predict_labels(model, images, EvalConfig()).numpy()


# --- the PyTorch predictor (no ONNX) ---------------------------------------------------------------------


@pytest.mark.parametrize("scorer, chunk", [("linear", 1024), ("embedding", 1), ("embedding", 7), ("embedding", 40),
                                           ("embedding", 1024)])
def test_exportable_predictor_equals_predict_labels(scorer, chunk):
    model = random_model([*SMALL, f"model.head.scorer={scorer}"])
    predictor = ExportablePredictor(model, chunk_classes=chunk)
    for shape in [(2, 64, 64), (1, 37, 53)]:
        images = random_images(shape, seed=shape[1])
        assert torch.equal(predictor(images), predict_labels(model, images, EvalConfig()))


@pytest.mark.parametrize("scorer", ["linear", "embedding"])
def test_exportable_pyramid_predictor_equals_predict_labels(scorer):
    overrides = [*SMALL_PYRAMID, "model.head.pyramid.strides=[32,16,8,4]", "model.head.pyramid.context_bins=[1,3,6]",
                 f"model.head.scorer={scorer}"]
    model = random_model(overrides)
    with torch.no_grad():  # random weights: unity probabilities near 0.5; a tau that some cells of each level pass
        unity = torch.cat([u.flatten() for u in model(random_images((2, 64, 64)))["unity"]]).sigmoid()
    model.head.tau = float(unity.quantile(0.7))
    predictor = ExportablePredictor(model, chunk_classes=16)
    for shape in [(2, 64, 64), (1, 37, 53), (1, 20, 24)]:
        images = random_images(shape, seed=shape[1])
        assert torch.equal(predictor(images), predict_labels(model, images, EvalConfig()))
        with torch.no_grad():
            shares = model.head.summarize_counts(model.dense_with_counts(images)[1])
        assert 0 < shares["level_stride_4"] < 100  # fused: some pixels from coarse cells


def test_chunked_nearest_class_is_the_brute_force_argmin_and_ties_go_to_the_lower_id():
    """`scaleseg.search.nearest_class`, what eval's decide and the exported graph both run."""
    model = random_model([*SMALL, "model.head.scorer=embedding"], num_classes=40)
    scorer = model.head.scorer
    dense = torch.nn.functional.normalize(torch.randn(2, 12, 9, 7), dim=1)
    classes = scorer.classes().double()
    queries = dense.double().permute(0, 2, 3, 1).reshape(-1, 12)
    brute = torch.cdist(queries, classes).argmin(dim=1).view(2, 9, 7)  # float64, all classes at once
    for chunk in (1, 3, 16, 40, 64):
        assert torch.equal(model.decide(dense, chunk), brute)
        assert torch.equal(nearest_class(queries.float(), classes.float(), chunk_classes=chunk).view(2, 9, 7), brute)
    assert torch.equal(model.decide(dense), brute)  # chunked by the search budget
    # exact ties: classes 5, 18 and 33 are the same unit vector, as is the query -> class 5 in every chunking
    with torch.no_grad():
        scorer.class_embeddings[:] = torch.eye(12).repeat(4, 1)[:40] * 3.0  # class c points along axis c % 12
        scorer.class_embeddings[18] = scorer.class_embeddings[5]
        scorer.class_embeddings[33] = scorer.class_embeddings[5]
        scorer.class_embeddings[17] = -scorer.class_embeddings[5]  # the farthest: never chosen
    query = torch.zeros(1, 12, 1, 2)
    query[0, 5] = 1.0
    for chunk in (1, 4, 16, 18, 19, 40):
        assert model.decide(query, chunk).flatten().tolist() == [5, 5]
    tied = scorer.classes()
    for budget in (64, 1000, 2**20):  # query tiles of every size
        assert nearest_class(query.permute(0, 2, 3, 1).reshape(-1, 12), tied, budget_bytes=budget).tolist() == [5, 5]


def test_the_traceable_model_functions_equal_their_usual_forms():
    """The pyramid's pooling and cell upsampling are written to trace at any size (the export traces the
    model as it is); they equal adaptive average pooling and repeat_interleave."""
    for h, w in [(16, 16), (5, 7), (1, 1), (3, 11)]:
        x = torch.randn(2, 4, h, w)
        reference = torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, b).flatten(2) for b in (1, 2, 3, 6)], dim=2)
        torch.testing.assert_close(pyramid_pool(x, (1, 2, 3, 6)), reference, rtol=0, atol=1e-6)
        assert torch.equal(upsample_cells(x, 4), x.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1))
        mask = x[:, 0] > 0
        assert torch.equal(upsample_cells(mask, 2), mask.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))


# --- ONNX ------------------------------------------------------------------------------------------------


def test_export_onnx_cli_linear_end_to_end_and_sidecar(checkpoints, linear_onnx):
    ckpt_path = checkpoints["linear"]
    out, printed = linear_onnx
    assert f"wrote {out} and {out.with_suffix('.json')}" in printed
    assert "verified with onnxruntime" in printed and "of 23040 pixels" in printed

    model, ckpt, _ = load_checkpoint_model(ckpt_path)
    for shape in [(1, 64, 64), (2, 72, 56)]:  # the traced size and another; dynamic batch
        images = random_images(shape, seed=10 + shape[0])
        got, want = onnx_labels(out, images), torch_labels(model, images)
        assert got.dtype == np.int64 and got.shape == want.shape
        assert (got == want).mean() >= 0.999

    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["num_classes"] == 40 and meta["ignore_index"] == ckpt["ignore_index"]
    assert meta["class_names"] == ckpt["class_names"]
    assert meta["palette"] == ckpt["palette"].tolist()
    assert meta["model"] == ckpt["config"]["model"]
    assert meta["source"] == {"checkpoint": str(ckpt_path.resolve()), "iteration": 2}
    assert meta["scaleseg_version"] == __import__("scaleseg").__version__
    assert meta["prediction"] == {"mode": "whole", "scales": [1.0], "flip": False}
    assert meta["export"]["verification"]["agreement"] >= 0.999
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape) == (meta["input"]["name"], ["batch", 3, "height", "width"])
    assert (outp.name, outp.shape) == (meta["output"]["name"], ["batch", "height", "width"])
    # the sidecar's normalisation, applied by hand to a uint8 RGB image, is what `to_tensor` does
    norm = meta["input"]["normalization"]
    assert (norm["mean"], norm["std"], meta["input"]["channel_order"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD), "RGB")
    rgb = np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    by_hand = ((rgb.astype(np.float32) - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32))
    by_hand = by_hand.transpose(2, 0, 1)[None]
    np.testing.assert_allclose(by_hand[0], to_tensor(rgb).numpy(), rtol=0, atol=1e-5)
    assert (session.run(None, {"image": by_hand})[0] == torch_labels(model, to_tensor(rgb)[None])).mean() >= 0.999


def test_export_onnx_embedding_in_class_chunks_beside_the_checkpoint(checkpoints):
    import onnx

    ckpt_path = checkpoints["embedding"]
    result = export_onnx(ckpt_path, chunk_classes=16)  # 40 classes: chunks of 16, 16 and 8
    assert result["onnx"] == ckpt_path.with_suffix(".onnx") and result["sidecar"] == ckpt_path.with_suffix(".json")
    assert result["verification"]["agreement"] >= 0.999
    graph = onnx.load(str(result["onnx"])).graph
    assert sum(n.op_type == "ArgMin" for n in graph.node) == 3  # one argmin per chunk, in the graph
    meta = json.loads(result["sidecar"].read_text())
    assert (meta["export"]["chunk_classes"], meta["export"]["chunks"]) == (16, 3)
    model, _, _ = load_checkpoint_model(ckpt_path)
    for shape in [(1, 64, 64), (3, 48, 80)]:
        images = random_images(shape, seed=20 + shape[0])
        assert (onnx_labels(result["onnx"], images) == torch_labels(model, images)).mean() >= 0.999


def test_export_onnx_pyramid_head_with_dynamic_sizes(tmp_path):
    overrides = [*SMALL_PYRAMID, "model.head.scorer=embedding"]
    model = random_model(overrides)
    ckpt_path = save_model_checkpoint(model, overrides, tmp_path / "pyramid.pth")
    result = export_onnx(ckpt_path, tmp_path / "pyramid.onnx", chunk_classes=32)
    assert result["verification"]["agreement"] >= 0.999
    for shape in [(1, 64, 64), (2, 44, 70), (1, 20, 24)]:  # padded to 64, 48x72 and 24x24 inside the graph
        images = random_images(shape, seed=30 + shape[1])
        assert (onnx_labels(result["onnx"], images) == torch_labels(model, images)).mean() >= 0.999


def test_verification_compares_with_the_pytorch_predictor(checkpoints, linear_onnx):
    onnx_path = linear_onnx[0]
    model, _, _ = load_checkpoint_model(checkpoints["linear"])
    assert verify_onnx(onnx_path, ExportablePredictor(model), [(1, 40, 40)])["agreement"] == 1.0
    with torch.no_grad():
        model.head.scorer.classifier.bias[7] += 100.0  # now PyTorch predicts class 7 everywhere
    with pytest.raises(ScalesegError, match=r"agree on .*% of the pixels \(need 99.9%\)"):
        verify_onnx(onnx_path, ExportablePredictor(model), [(1, 40, 40)])


# --- safetensors ------------------------------------------------------------------------------------------


def test_safetensors_round_trip_cli(checkpoints, tmp_path, capsys):
    from safetensors import safe_open

    ckpt_path = checkpoints["embedding"]
    out = tmp_path / "weights.safetensors"
    assert main(["export", str(ckpt_path), "--format", "safetensors", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ref, ckpt, cfg = load_checkpoint_model(ckpt_path)
    with safe_open(str(out), framework="pt") as f:  # every tensor of the state dict, unchanged
        assert set(f.keys()) == set(ckpt["model"])
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), ckpt["model"][key])
    model, meta = load_safetensors_model(out)
    assert not model.training
    assert meta["config"] == cfg.to_dict() and meta["num_classes"] == 40 and meta["ignore_index"] == 255
    assert meta["class_names"] == ckpt["class_names"] and meta["palette"] == ckpt["palette"].tolist()
    images = random_images((2, 48, 56))
    with torch.no_grad():
        assert torch.equal(model.dense(images), ref.dense(images))
        assert torch.equal(predict_labels(model, images, EvalConfig()), predict_labels(ref, images, EvalConfig()))


def test_safetensors_round_trip_of_a_pyramid_with_a_shared_class_table(tmp_path):
    overrides = [*SMALL_PYRAMID, "model.head.scorer=embedding"]
    model = random_model(overrides)
    ckpt_path = save_model_checkpoint(model, overrides, tmp_path / "pyr.pth")
    result = export_safetensors(ckpt_path)  # default: beside the checkpoint
    assert result["safetensors"] == tmp_path / "pyr.safetensors"
    loaded, meta = load_safetensors_model(tmp_path / "pyr.safetensors")
    assert meta["source"]["iteration"] == 7
    assert loaded.head.scorers[0].class_embeddings is loaded.head.scorers[1].class_embeddings  # still one table
    images = random_images((1, 40, 40))
    with torch.no_grad():
        assert torch.equal(loaded.dense(images), model.dense(images))


# --- errors -----------------------------------------------------------------------------------------------


def test_export_errors_name_the_problem(checkpoints, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope.pth"
    assert main(["export", str(missing), "--format", "onnx"]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["export", str(corrupt), "--format", "safetensors"]) == 2
    assert "cannot be read safely" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(checkpoints["linear"]), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    assert main(["export", str(checkpoints["linear"]), "--format", "onnx", "--out", str(tmp_path / "x.pb")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert main(["export", str(checkpoints["linear"]), "--format", "safetensors", "--chunk-classes", "8"]) == 2
    assert "--chunk-classes applies to --format onnx only" in capsys.readouterr().err
    with pytest.raises(ScalesegError, match="chunk_classes = 0"):
        ExportablePredictor(random_model(SMALL), chunk_classes=0)
    for module, fmt in [("onnxruntime", "onnx"), ("onnxscript", "onnx"), ("safetensors.torch", "safetensors")]:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # `import` raises ImportError
            assert main(["export", str(checkpoints["linear"]), "--format", fmt]) == 2
            err = capsys.readouterr().err
            assert f"{module!r} package, which is not installed: pip install 'scaleseg[export]'" in err
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safetensors_model(tmp_path / "absent.safetensors")


def test_a_sidecar_of_another_kind_is_not_overwritten(checkpoints, tmp_path):
    import shutil

    ckpt = shutil.copy(checkpoints["linear"], tmp_path / "best.pth")
    (tmp_path / "best.json").write_text('{"format": "scaleseg-onnx"}')  # as `--format onnx` left it
    with pytest.raises(ScalesegError, match=r"best.json' exists and is the sidecar of a scaleseg-onnx export.*"
                                            r"e.g. .*best-safetensors.safetensors"):
        export_safetensors(ckpt)
    (tmp_path / "best.json").write_text("my own notes")
    with pytest.raises(ScalesegError, match="exists and is not a scaleseg sidecar"):
        export_onnx(ckpt, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.pth"]
    assert export_safetensors(ckpt, tmp_path / "w.safetensors")["sidecar"] == tmp_path / "w.json"
    export_safetensors(ckpt, tmp_path / "w.safetensors")  # its own kind: replaced


def test_a_failed_verification_leaves_no_file(checkpoints, tmp_path, monkeypatch):
    import scaleseg.export as export

    def broken_export(predictor, path, example_size):
        path.write_bytes(b"not an onnx graph")
        return {}

    monkeypatch.setattr(export, "export_onnx_file", broken_export)
    out = tmp_path / "broken.onnx"
    with pytest.raises(ScalesegError, match="onnxruntime cannot load the exported graph"):
        export.export_onnx(checkpoints["linear"], out)
    assert list(tmp_path.iterdir()) == []  # neither the graph, its temporary nor the sidecar
