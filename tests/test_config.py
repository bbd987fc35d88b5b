"""Training configurations: the shipped presets, config files, and their errors."""

import json

import pytest
import torch

from fastddpm.config import TrainConfig, load_config, preset, preset_names


def test_presets_are_the_recipes():
    assert preset_names() == ["cifar10", "digits"]
    cifar = preset("cifar10")
    assert (cifar.lr, cifar.warmup, cifar.grad_clip, cifar.batch_size, cifar.ema_decay, cifar.dropout, cifar.hflip,
            cifar.loss, cifar.model) == (2e-4, 5000, 1.0, 128, 0.9999, 0.1, True, "simple", "ddpm-cifar10")
    digits = preset("digits")
    assert (digits.lr, digits.ema_decay, digits.steps, digits.model, digits.grid_scale) == (2e-3, 0.995, 1500, "auto", None)
    assert preset("digits", steps=7).steps == 7


def test_json_and_yaml_files_start_from_a_preset(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"preset": "cifar10", "steps": 10, "_note": "a comment"}))
    config = load_config(tmp_path / "a.json", lr=0.5)
    assert (config.steps, config.lr, config.warmup) == (10, 0.5, 5000)
    yaml = pytest.importorskip("yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"steps": 3, "batch_size": 8}))
    config = load_config(tmp_path / "b.yaml")
    assert (config.steps, config.batch_size, config.lr) == (3, 8, 2e-3)  # digits is the default base


def test_a_config_file_starts_from_the_preset_given_unless_it_names_its_own(tmp_path):
    (tmp_path / "plain.json").write_text(json.dumps({"steps": 10}))
    (tmp_path / "own.json").write_text(json.dumps({"preset": "digits", "steps": 10}))
    assert load_config(tmp_path / "plain.json", "cifar10").warmup == 5000  # --preset cifar10 --config plain.json
    assert load_config(tmp_path / "own.json", "cifar10").warmup == 100  # the file's own preset wins
    assert load_config(tmp_path / "plain.json").warmup == 100


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ({"stepz": 3}, ".json", r"unknown training options \['stepz'\]"),
        ({"steps": 0}, ".json", "steps must be a positive integer, got 0"),
        ({"precision": "fp8"}, ".json", "unknown precision 'fp8'; expected one of: fp32, bf16, fp16"),
        ({"ema_decay": 1.0}, ".json", r"ema_decay must be a finite number in \[0, 1\), got 1.0"),
        ({"sample_solver": "euler"}, ".json", "unknown sample_solver 'euler'; expected one of: ddpm, ddim, dpmpp_2m, "),
        ({"model": "unet-xl"}, ".json", "unknown model 'unet-xl'; expected one of: auto, ddpm-cifar10, ddpm-256, "),
        ({"model_budget": 0}, ".json", r"model_budget must be a positive number \(MFLOPs per pixel\), got 0"),
        ({"grid_scale": 0}, ".json", "grid_scale must be a positive integer or null, got 0"),
        ({"preset": "imagenet"}, ".json", "unknown training preset 'imagenet'"),
        ([1, 2], ".json", "must hold a mapping of TrainConfig fields"),
        ("{not json", ".json", "is not valid JSON"),
        ({"steps": 1}, ".toml", "config file must end in .json, .yaml or .yml"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    "field, value, message",
    [  # issue 14, item 3: what a JSON file can hold that is not what it means
        ("hflip", "false", "hflip must be true or false, got 'false'"),  # a non-empty string was truthy: flips on
        ("compile", "false", "compile must be true or false or null, got 'false'"),
        ("channels_last", "no", "channels_last must be true or false or null, got 'no'"),
        ("tf32", 1, "tf32 must be true or false or null, got 1"),
        ("nll_images", -5, "nll_images must be a non-negative integer or null, got -5"),  # evaluated 292 of 297
        ("nll_images", "0", "nll_images must be a non-negative integer or null, got '0'"),  # failed after training
        ("ema_decay", "0.9", r"ema_decay must be a finite number in \[0, 1\), got '0.9'"),
        ("lr", float("nan"), r"lr must be a finite number in \[0, inf\), got nan"),
        ("dropout", 1, r"dropout must be a finite number in \[0, 1\) or null, got 1"),
        ("device", "banana", "device must be a torch device such as cpu or cuda, got 'banana'"),
        ("device", 0, "device must be a torch device such as cpu or cuda, got 0"),
        ("image_size", "8", "image_size must be a positive integer or null, got '8'"),  # item 12
        ("seed", 2**64, r"seed must be an integer in \[0, 2\*\*64\), got 18446744073709551616"),
        ("schedule", "cosin", "unknown schedule 'cosin'; expected one of: linear, cosine, quadratic, sigmoid"),
        ("data", 5, r"data must be a path \(a string\) or null"),
    ],
)
def test_every_field_is_checked_by_type_and_range(tmp_path, field, value, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_a_cuda_device_without_cuda_is_refused_when_the_config_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"device": "cuda"}))
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available on this machine"):
        load_config(path)


def test_missing_file_and_bad_fields():
    with pytest.raises(ValueError, match="config file not found: nope.json"):
        load_config("nope.json")
    with pytest.raises(ValueError, match="unknown variance .learned.; expected one of: fixed_small"):
        TrainConfig(variance="learned")

