import pytest
import yaml

from scaleseg.config import Config, config_from_dict, load_config, parse_override, save_config
from scaleseg.errors import ConfigError


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg.data.dataset == "synthetic" and cfg.name == "default"
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()  # the saved name is kept


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["model.backbone=resnet50", "train.iters=200", "data.train_pipeline.crop_size=96",
                             "optim.lr=1e-3", "model.pretrained=null", "eval.scales=[0.5, 1.0]"])
    assert cfg.model.backbone == "resnet50"
    assert cfg.train.iters == 200
    assert cfg.data.train_pipeline.crop_size == (96, 96)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.pretrained is None
    assert cfg.eval.scales == (0.5, 1.0)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("model.backbon=resnet50", r"unknown config key 'model.backbon' \(did you mean 'model.backbone'\?\)"),
        ("nosuch.key=1", r"unknown config key 'nosuch'"),
        ("train.iters=many", r"train.iters = 'many': expected an integer"),
        ("train.iters=2.5", r"train.iters = 2.5: expected an integer"),
        ("train.deterministic=1", r"train.deterministic = 1: expected true or false"),
        ("model.backbone=vgg16", r"model.backbone = 'vgg16' is not allowed; choose one of 'resnet_tiny'"),
        ("model.output_stride=4", r"model.output_stride = 4 is not allowed"),
        ("train.iters=0", r"train.iters = 0: must be > 0"),
        ("data.num_classes=1", r"data.num_classes = 1"),
        ("data.ignore_index=3", r"data.ignore_index = 3 is a class id"),
        ("data.train_pipeline.crop_size=[512, 512]", r"data.train_pipeline.crop_size = \[512, 512\] is larger"),
        ("data.train_pipeline.crop_size=[1, 2, 3]", r"crop_size = \[1, 2, 3\]: expected 2 values"),
        ("eval.stride=600", r"eval.stride = \[600, 600\] is larger than eval.crop_size"),
        ("model.pretrained=/no/such/file.pth", r"model.pretrained = '/no/such/file.pth': no such file"),
        ("optim.momentum=1.5", r"optim.momentum = 1.5: must be in \[0.0, 1.0\)"),
        ("model.decoder=3", r"model.decoder must be a mapping"),
        ("train.iters", r"write it as dotted.key=value"),
        ("train.device=tpu", r"train.device = 'tpu'"),
        ("model.head.embedding.embed_dim=0", r"model.head.embedding.embed_dim = 0: must be > 0"),
        ("model.head.embedding.temperature=0", r"model.head.embedding.temperature = 0.0: must be > 0"),
        ("model.head.embedding.loss=approx", r"model.head.embedding.loss = 'approx' is not allowed"),
        ("model.head.scorer=cosine", r"model.head.scorer = 'cosine' is not allowed; choose one of 'linear', 'embedding'"),
    ],
)
def test_bad_values_name_the_dotted_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_yaml_file_with_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"train": {"iters": 300, "seed": 5}, "data": {"batch_size": 4}}))
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  iters: 400\n")
    cfg = load_config(tmp_path / "child.yaml", ["data.batch_size=6"])
    assert (cfg.train.iters, cfg.train.seed, cfg.data.batch_size, cfg.name) == (400, 5, 6, "child")


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("trian:\n  iters: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*did you mean 'train'"):
        load_config(tmp_path / "typo.yaml")


def test_repository_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("**/*.yaml"))
    assert configs, "configs/ holds no YAML files"
    for path in configs:
        cfg = load_config(path, ["model.pretrained=null"])
        assert isinstance(cfg, Config)


def test_parse_override_and_from_dict():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=") == ("a.b", None)
    cfg = config_from_dict({"train": {"iters": 7}})
    assert cfg.train.iters == 7


def test_more_neighbours_than_negatives_is_refused():
    with pytest.raises(ConfigError, match=r"num_neighbours = 20 is more than the 9 negatives .* data.num_classes = 10"):
        load_config(None, ["data.num_classes=10", "model.head.scorer=embedding", "model.head.embedding.num_neighbours=20"])
    # the exact loss has no neighbours to search: allowed
    load_config(None, ["data.num_classes=10", "model.head.scorer=embedding", "model.head.embedding.num_neighbours=20",
                       "model.head.embedding.loss=full"])


def test_optimizer_groups_are_set_in_the_config_and_keep_their_defaults():
    """optim.groups.<name>: a nested key changes that field alone, the group's other defaults stay."""
    import torch

    from scaleseg.engine.optim import build_optimizer
    from scaleseg.models import build_model

    cfg = load_config(None, ["optim.groups.backbone.momentum=0.5", "optim.groups.class_embeddings.lr_mult=3",
                             "model.head.scorer=embedding", "optim.lr=0.02"])
    assert cfg.optim.groups.backbone.lr_mult == 0.1 and cfg.optim.groups.backbone.momentum == 0.5
    assert cfg.optim.groups.class_embeddings.momentum == 0.95 and cfg.optim.groups.class_embeddings.lr_mult == 3
    model = build_model(cfg.model, 20, 255)
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    assert set(groups) == {"backbone", "decoder", "head", "class_embeddings"}
    want = {  # (lr, momentum, weight decay, poly power)
        "backbone": (0.002, 0.5, 1e-4, 0.9), "decoder": (0.02, 0.9, 1e-4, 0.9),
        "head": (0.02, 0.9, 1e-4, 0.9), "class_embeddings": (0.06, 0.95, 1e-4, 0.95),
    }
    for name, (lr, momentum, wd, power) in want.items():
        g = groups[name]
        assert (g["lr"], g["momentum"], g["weight_decay"], g["poly_power"]) == pytest.approx((lr, momentum, wd, power))
    assert groups["class_embeddings"]["params"] == [model.head.scorer.class_embeddings]
    seen = [id(p) for g in groups.values() for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert isinstance(groups["backbone"]["params"][0], torch.nn.Parameter)
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.groups.table'.*class_embeddings"):
        load_config(None, ["optim.groups.table.lr_mult=2"])
    with pytest.raises(ConfigError, match=r"optim.groups.head.momentum = 1.5"):
        load_config(None, ["optim.groups.head.momentum=1.5"])


@pytest.mark.parametrize("old, new, value", [
    ("optim.backbone_lr_mult", "optim.groups.backbone.lr_mult", 1.0),
    ("model.head.embedding.embedding_lr_mult", "optim.groups.class_embeddings.lr_mult", 30.0),
    ("model.head.embedding.embedding_momentum", "optim.groups.class_embeddings.momentum", 0.9),
    ("model.head.embedding.embedding_poly_power", "optim.groups.class_embeddings.poly_power", 1.0),
])
def test_renamed_keys_are_refused_with_their_new_name_and_carried_over_from_old_checkpoints(old, new, value):
    from scaleseg.config import RENAMED_KEYS, apply_overrides, migrate_renamed_keys
    from scaleseg.engine.checkpoint import config_from_checkpoint

    assert RENAMED_KEYS[old] == new
    with pytest.raises(ConfigError, match=f"config key '{old}' is now '{new}'"):
        load_config(None, [f"{old}={value}"])
    saved = apply_overrides(Config().to_dict(), [f"{old}={value}"])  # a config written by an earlier version
    cfg = config_from_checkpoint({"config": saved})
    section, *rest = new.split(".")
    node = getattr(cfg, section)
    for part in rest:
        node = getattr(node, part)
    assert node == value
    assert old.rsplit(".", 1)[1] not in str(migrate_renamed_keys(saved))
