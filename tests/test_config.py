"""Configs are validated at load, and errors name the bad key."""

import pytest

from refocus_ray.config import ConfigError, load_config


def test_embedded_config_loads():
    cfg = load_config("configs/embedded.yaml")
    assert cfg.pool.max_frames == 128 and cfg.encoders.frame == "efficientnet_lite0"


@pytest.mark.parametrize("text,message", [
    ("pool: {max_frame: 64}", "pool.max_frame: unknown key"),
    ("pool: {max_frames: -1}", "pool.max_frames: must be > 0"),
    ("pool: {max_fps: fast}", "pool.max_fps: expected"),
    ("data: {kind: table}", "data.table: required"),
    ("data: {kind: hub}", "data.kind: must be one of"),
    ("colour: red", "colour: unknown key"),
    ("data: {families: [apear]}", "data.families: must be one of"),
    ("data: {duration_s: [30]}", "data.duration_s: needs 2 numbers"),
    ("data: {duration_s: [2, 4]}", "data: EvidenceConfig: min_duration_s"),
])
def test_errors_name_the_key(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_overrides_use_dotted_keys():
    cfg = load_config("configs/embedded.yaml", {"pool.max_frames": 64})
    assert cfg.pool.max_frames == 64


def test_forge_answerer_without_its_section_is_a_clear_error(tmp_path):
    """`forge-reference --answerer` on a config with no answering model says so, forging nothing."""
    from refocus_ray import cli

    p = tmp_path / "c.yaml"
    p.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{kind: table, table: {tmp_path}/q.parquet}}\n")
    with pytest.raises(SystemExit, match="no forge_answerer: section"):
        cli.main(["forge-reference", "--answerer", "--config", str(p)])
    assert not (tmp_path / "run").exists()
