"""Training config: loading, precedence, type errors, validation messages, round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from fope_megatron.config import (
    Config,
    ConfigError,
    check_data,
    check_vocab,
    load_config,
)
from fope_megatron.model.vocab import padded_vocab_size

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
DEEPSPEED_JSONS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def _raises(overrides: list[str], world: int = 1, *needles: str) -> str:
    """Load with ``overrides``, validate for ``world`` ranks, expect a ConfigError with needles."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides).validate(world)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {str(err.value)!r}"
    return str(err.value)


# ----------------------------------------------------------------------------- loading


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_defaults_load_resolve_and_validate() -> None:
    config = load_config(None, [])
    assert config.train.steps == Config().train.steps
    assert config.fope.train_seq_len == config.train.seq_length
    assert config.fope.seed == config.run.seed
    assert config.model.ffn_hidden_size == 4 * config.model.hidden_size
    assert config.train.eval_lengths == []
    assert config.validate(1).dp == 1


def test_file_beats_defaults_and_command_line_beats_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 50\n  lr: 1e-3\n  seq_length: 256\nmodel:\n  swiglu: false\n")
    config = load_config(path, ["train.steps=70", "model.num_layers=3"])
    assert config.train.steps == 70  # command line
    assert config.train.lr == 1e-3 and isinstance(config.train.lr, float)  # file ("1e-3" string)
    assert config.model.swiglu is False  # file
    assert config.model.num_layers == 3  # command line
    assert config.train.micro_batch_size == Config().train.micro_batch_size  # default
    assert config.fope.train_seq_len == 256  # derived from the file's seq_length


def test_override_value_parsing() -> None:
    config = load_config(
        None,
        [
            "run.tensorboard=false",
            "train.lr=1e-3",
            "train.eval_lengths=[128,256]",
            "train.init_from=null",
            "model.num_query_groups=none",
            "model.normalization=layernorm",
            "model.rotary_base=5e5",
            "train.steps=1e3",
            "data.path=[0.3,/a/x,0.7,/b/y]",
            "train.exit_at_step=0",
            "run.dir=runs/with=sign",
        ],
    )
    assert config.run.tensorboard is False
    assert config.train.lr == 1e-3
    assert config.train.eval_lengths == [128, 256]
    assert config.train.init_from is None and config.model.num_query_groups is None
    assert config.model.normalization == "LayerNorm"
    assert config.model.rotary_base == 5e5 and config.train.steps == 1000
    assert config.data.path == [0.3, "/a/x", 0.7, "/b/y"]
    assert config.train.exit_at_step is None  # 0 means off
    assert config.run.dir == "runs/with=sign"
    assert load_config(None, ["train.eval_lengths=128,256"]).train.eval_lengths == [128, 256]
    assert load_config(None, ["data.path=/a/x"]).data.path == ["/a/x"]


def test_unknown_key_lists_allowed_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.stpes=3"])
    msg = str(err.value)
    assert "unknown key 'train.stpes'" in msg
    assert "allowed in 'train': steps, micro_batch_size," in msg
    assert "did you mean 'steps'?" in msg


def test_unknown_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown section 'trian' .*did you mean 'train'\?"):
        load_config(path, [])


@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.steps=abc", ["train.steps='abc'", "expected an integer"]),
        ("train.steps=1.5", ["train.steps=1.5", "expected an integer"]),
        ("train.lr=fast", ["train.lr='fast'", "expected a number"]),
        ("run.tensorboard=maybe", ["run.tensorboard='maybe'", "true/false"]),
        ("train.micro_batch_size=true", ["train.micro_batch_size=True", "integer"]),
        ("train.eval_lengths=[128,x]", ["train.eval_lengths[1]='x'", "integer"]),
        ("model.num_query_groups=two", ["model.num_query_groups='two'", "an integer or null"]),
        ("run.dir=[a,b]", ["run.dir=['a', 'b']", "a string"]),
        ("model.position_embedding=alibi", ["'alibi'", "'fope', 'rope', 'none'"]),
        ("train.precision=fp16", ["train.precision='fp16'", "'auto', 'fp32', 'bf16'"]),
    ],
)
def test_wrong_types_name_key_value_and_type(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("override", ["train.steps", "steps=3", "a.b.c=1", ".steps=1"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", [])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml", [])
    (tmp_path / "scalar.yaml").write_text("train: 3\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(tmp_path / "scalar.yaml", [])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, world, needles",
    [
        (["parallel.tp=2", "parallel.cp=2"], 6, ["world_size=6", "2*2*1*1 = 4"]),
        (
            ["train.global_batch_size=10", "train.micro_batch_size=4"],
            2,
            [
                "train.global_batch_size=10 must be divisible by train.micro_batch_size * dp "
                "= 4 * 2 = 8"
            ],
        ),
        (
            ["model.num_attention_heads=6", "model.hidden_size=192", "parallel.tp=4"],
            4,
            ["model.num_attention_heads=6", "parallel.tp=4"],
        ),
        (
            [
                "model.num_attention_heads=12",
                "model.hidden_size=192",
                "model.num_query_groups=6",
                "parallel.tp=4",
                "train.global_batch_size=8",
            ],
            4,
            ["model.num_query_groups=6", "parallel.tp=4", "replicated"],
        ),
        (["model.num_query_groups=3"], 1, ["model.num_query_groups=3", "num_attention_heads=4"]),
        (["model.hidden_size=130"], 1, ["model.hidden_size=130", "heads=4"]),
        (["model.hidden_size=12"], 1, ["model.rotary_percent=1.0", "int(3 * 1.0) = 3", "even"]),
        (
            ["parallel.cp=2", "train.seq_length=102"],
            2,
            ["train.seq_length=102", "2*parallel.cp = 4"],
        ),
        (["parallel.ulysses=2", "train.seq_length=129"], 2, ["train.seq_length=129", "ulysses=2"]),
        (["parallel.ulysses=8"], 8, ["model.num_attention_heads=4", "parallel.ulysses=8"]),
        (
            ["parallel.tp=2", "deepspeed.zero_stage=3", "deepspeed.offload=true"],
            2,
            ["deepspeed.offload=true", "parallel.tp=2", "not supported"],
        ),
        (["parallel.sp=true"], 1, ["parallel.sp=True", "parallel.tp > 1"]),
        (
            ["parallel.tp=4", "parallel.sp=true", "train.seq_length=130"],
            4,
            ["train.seq_length=130", "parallel.tp=4"],
        ),
        (["parallel.pp=2"], 2, ["parallel.pp=2", "only 1"]),
        (["train.lr=0"], 1, ["train.lr=0.0", "> 0"]),
        (["train.lr=1e-4", "train.min_lr=1e-3"], 1, ["train.min_lr=0.001", "train.lr=0.0001"]),
        (["train.steps=10", "train.warmup_steps=20"], 1, ["train.warmup_steps=20", "steps=10"]),
        (["train.warmup_steps=-1"], 1, ["train.warmup_steps=-1", ">= 0"]),
        (
            ["train.steps=10", "train.warmup_steps=1", "train.exit_at_step=11"],
            1,
            ["train.exit_at_step=11", "train.steps=10"],
        ),
        (["train.micro_batch_size=0"], 1, ["train.micro_batch_size=0", ">= 1"]),
        (["train.adam_beta2=1.0"], 1, ["train.adam_beta2=1.0", "< 1"]),
        (["model.rotary_percent=1.5"], 1, ["model.rotary_percent=1.5", "(0, 1]"]),
        (["model.rotary_base=1"], 1, ["model.rotary_base=1.0", "> 1"]),
        (["train.eval_lengths=[0]"], 1, ["train.eval_lengths=[0]", ">= 1"]),
        (["position.scaling=yarn"], 1, ["position.factor=1.0", "> 1", "'yarn'"]),
        (["position.factor=4"], 1, ["position.factor=4.0", "scaling='none'"]),
        (
            ["model.position_embedding=none", "position.scaling=pi", "position.factor=2"],
            1,
            ["position.scaling='pi'", "fope' or 'rope'"],
        ),
        (["fope.zero_freq_sin=0.5"], 1, ["fope.zero_freq_sin=0.5", "1", "0"]),
        (["fope.d_out=17"], 1, ["fope.d_out=17", "16"]),
        (["fope.sigma=-1"], 1, ["fope.sigma=-1.0", ">= 0"]),
        (["deepspeed.zero_stage=4"], 1, ["deepspeed.zero_stage=4", "0, 1, 2, 3"]),
        (
            ["deepspeed.offload=true", "deepspeed.zero_stage=1"],
            1,
            ["deepspeed.offload=True", "zero_stage=3"],
        ),
        (["deepspeed.config=/nonexistent/ds.json"], 1, ["/nonexistent/ds.json", "existing"]),
        (["train.resume=/nonexistent/ckpt"], 1, ["train.resume='/nonexistent/ckpt'", "'auto'"]),
        (["data.split=98,x"], 1, ["data.split='98,x'", "train,valid,test"]),
        (["data.path=[0.5,/a,/b]"], 1, ["data.path=", "[w1, prefix1"]),
        (["data.path=[/a]", "data.synthetic=true"], 1, ["data.path=['/a']", "synthetic"]),
    ],
)
def test_validation_errors_name_key_value_and_rule(
    overrides: list[str], world: int, needles: list[str]
) -> None:
    _raises(overrides, world, *needles)


@pytest.mark.parametrize(
    "overrides, world, dp",
    [
        (
            [
                "parallel.tp=2",
                "parallel.sp=true",
                "deepspeed.zero_stage=1",
                "train.global_batch_size=16",
            ],
            4,
            2,
        ),
        (["model.num_attention_heads=8", "model.num_query_groups=2", "parallel.tp=4"], 4, 1),
        (["parallel.cp=2", "parallel.ulysses=2", "train.global_batch_size=32"], 8, 2),
        (["deepspeed.zero_stage=3", "train.global_batch_size=16"], 2, 2),
        (["deepspeed.offload=true", "deepspeed.zero_stage=3"], 1, 1),
        (["position.scaling=yarn", "position.factor=4"], 1, 1),
    ],
)
def test_valid_layouts(overrides: list[str], world: int, dp: int) -> None:
    assert load_config(None, overrides).validate(world).dp == dp


def test_deepspeed_json_choice(tmp_path: Path) -> None:
    assert load_config(None, []).deepspeed_json().name == "zero0.json"
    assert load_config(None, ["deepspeed.zero_stage=2"]).deepspeed_json().name == "zero2.json"
    offload = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.offload=true"])
    assert offload.deepspeed_json().name == "zero3_offload.json"
    custom = tmp_path / "ds.json"
    custom.write_text("{not json")
    config = load_config(None, [f"deepspeed.config={custom}"])
    assert config.deepspeed_json() == custom
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.validate(1)


# ----------------------------------------------------------------------------- data and vocab


def test_check_data(tmp_path: Path) -> None:
    assert check_data(load_config(None, ["data.synthetic=true"])) == []
    with pytest.raises(ConfigError, match=r"data.path=\[\].*data.synthetic=true"):
        check_data(load_config(None, []))
    prefix = str(tmp_path / "corpus_text_document")
    with pytest.raises(ConfigError) as err:
        check_data(load_config(None, [f"data.path=[{prefix}]"]))
    assert f"{prefix}.bin" in str(err.value)
    Path(prefix + ".bin").touch()
    with pytest.raises(ConfigError, match=f"{prefix}.idx"):
        check_data(load_config(None, [f"data.path=[{prefix}]"]))
    Path(prefix + ".idx").touch()
    assert check_data(load_config(None, [f"data.path={prefix}"])) == [prefix]
    blend = load_config(None, [f"data.path=[0.7,{prefix},0.3,{prefix}]"])
    assert check_data(blend) == [prefix, prefix]


def test_check_vocab_and_padding() -> None:
    config = load_config(None, ["model.vocab_size=200"])
    with pytest.raises(ConfigError) as err:
        check_vocab(config, 258)
    assert "model.vocab_size=200" in str(err.value) and "258" in str(err.value)
    check_vocab(load_config(None, []), 258)
    assert padded_vocab_size(load_config(None, [])) == 384
    assert padded_vocab_size(load_config(None, ["parallel.tp=2"])) == 384  # tp-independent
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by"):
        load_config(None, ["parallel.tp=2", "model.make_vocab_size_divisible_by=3"]).validate(2)


# ----------------------------------------------------------------------------- round trips


def test_round_trip(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "train.eval_lengths=[256,1024]",
            "data.path=[0.5,/a,0.5,/b]",
            "fope.learnable=true",
            "model.num_query_groups=2",
            "train.init_from=/ckpt",
            "position.scaling=yarn",
        ],
    )
    assert Config.from_dict(config.to_dict()) == config
    json.dumps(config.to_dict())  # plain types only
    config.save_yaml(tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml", []) == config
    raw = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert Config.from_dict(raw) == config
    assert raw["fope"]["train_seq_len"] == config.train.seq_length  # resolved, saved


def test_saved_train_seq_len_survives_eval_override(tmp_path: Path) -> None:
    load_config(None, ["train.seq_length=256"]).save_yaml(tmp_path / "config.yaml")
    config = load_config(tmp_path / "config.yaml", ["train.seq_length=1024"])
    assert config.fope.train_seq_len == 256


# ----------------------------------------------------------------------------- shipped files


def test_configs_are_shipped() -> None:
    assert (REPO / "configs" / "smoke.yaml") in SHIPPED
    names = {p.name for p in DEEPSPEED_JSONS}
    assert {f"zero{s}.json" for s in range(4)} | {"zero3_offload.json"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path: Path) -> None:
    config = load_config(path, [])
    p = config.parallel
    model_shard = p.tp * p.cp * p.ulysses * p.pp
    config.validate(model_shard)  # dp = 1 always fits: the batch becomes grad accumulation
    dp2 = config.train.global_batch_size % (2 * config.train.micro_batch_size) == 0
    if dp2:
        assert config.validate(2 * model_shard).dp == 2
    assert Config.from_dict(config.to_dict()) == config


def test_smoke_config_is_tiny_and_synthetic() -> None:
    config = load_config(REPO / "configs" / "smoke.yaml", [])
    assert config.data.synthetic and config.data.tokenizer == "byte"
    assert config.model.position_embedding == "fope"
    assert config.deepspeed.zero_stage == 0
    assert check_data(config) == []
    check_vocab(config, 258)


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=lambda p: p.name)
def test_deepspeed_jsons_parse(path: Path) -> None:
    raw = json.loads(path.read_text())
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert raw[key] == "auto", key
    assert raw["bf16"]["enabled"] == "auto"
    stage = raw["zero_optimization"]["stage"]
    assert path.stem.startswith(f"zero{stage}")
    # DeepSpeed's own schema (extra keys are rejected) accepts it once the placeholders are set.
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    raw.update(
        train_batch_size=8,
        train_micro_batch_size_per_gpu=8,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
    )
    raw["bf16"]["enabled"] = False
    assert ds_config.DeepSpeedConfig(raw).zero_optimization_stage == stage


def test_ulysses_needs_kv_groups_divisible() -> None:
    # 8 heads, 2 KV groups, ulysses 4: heads split, but 2 KV heads cannot be split 4 ways
    _raises(
        ["model.num_attention_heads=8", "model.num_query_groups=2", "parallel.ulysses=4",
         "train.global_batch_size=8"],
        4, "model.num_query_groups", "ulysses=4",
    )  # fmt: skip
    load_config(
        None, ["model.num_attention_heads=8", "model.num_query_groups=4", "parallel.ulysses=4",
               "train.global_batch_size=8"]
    ).validate(4)  # fmt: skip


# ----------------------------------------------------------------------------- derived values


def test_derived_values_are_properties_of_the_sections() -> None:
    cfg = load_config(
        None,
        ["model.hidden_size=96", "model.num_attention_heads=4", "model.rotary_percent=0.5"],
    )
    assert cfg.model.head_dim == 24 and cfg.model.rotary_dim == 12
    assert cfg.model.kv_groups == 4  # MHA when num_query_groups is unset
    cfg.model.num_query_groups = 2
    assert cfg.model.kv_groups == 2
    cfg.model.ffn_hidden_size = None
    assert cfg.model.ffn_size == 4 * 96  # megatron's default when unset
    cfg.model.ffn_hidden_size = 200
    assert cfg.model.ffn_size == 200
    assert cfg.fope_train_seq_len == cfg.train.seq_length == 512  # resolved from train
    raw = Config()  # unresolved: the None fields fall back as the properties say
    raw.train.seq_length = 300
    assert raw.fope_train_seq_len == 300 and raw.original_max_positions == 300
    raw.fope.train_seq_len = 200
    assert raw.fope_train_seq_len == 200 and raw.original_max_positions == 200
    raw.position.original_max_position_embeddings = 100
    assert raw.original_max_positions == 100


def test_to_fope_config_maps_every_fope_key() -> None:
    cfg = load_config(
        None,
        ["model.num_query_groups=2", "fope.sigma=0.5", "fope.d_out=3", "fope.interleaved=true",
         "fope.shared_across_layers=true", "fope.zero_freq_sin=0", "run.seed=7"],
    )  # fmt: skip
    f = cfg.to_fope_config()
    assert (f.head_dim, f.num_query_groups, f.rotary_dim) == (32, 2, 32)
    assert (f.train_seq_len, f.seed) == (cfg.train.seq_length, 7)
    assert (f.sigma, f.d_out, f.zero_freq_sin) == (0.5, 3, 0.0)
    assert f.interleaved and f.shared_across_layers and not f.learnable
    assert f.num_layers == cfg.model.num_layers and f.rotary_base == cfg.model.rotary_base


# ----------------------------------------------------------------------------- --help-config


def test_every_config_field_is_documented() -> None:
    from fope_megatron.config import field_docs

    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            doc = docs.get(f.name, "")
            assert doc and "\n" not in doc, f"{section.name}.{f.name} has no docstring"


def test_help_config_prints_every_key_and_starts_no_process_group(capsys) -> None:
    import torch.distributed as dist

    from fope_megatron.config import describe_fields
    from fope_megatron.train.__main__ import main

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    rows = describe_fields()
    cfg = Config()
    assert len(rows) == sum(
        len(dataclasses.fields(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)
    )
    for key, kind, default, doc in rows:
        assert f"  {key}  ({kind}, default {json.dumps(default)})\n      {doc}\n" in out + "\n"
    assert "train.precision  (Literal['auto', 'fp32', 'bf16'], default \"auto\")" in out
    assert not dist.is_initialized()
