"""Job spec validation: every invalid spec gets its own one-line message naming the field."""

from __future__ import annotations

import json

import pytest

from services.spec.errors import SpecError
from services.spec.jobspec import EvalSpec, TrainSpec, TuneSpec, parse_spec

TINY = {"conv_channels": 16, "primary_maps": 4}


def train(**kw):
    return {"kind": "train", **kw}


def tune(**kw):
    return {"kind": "tune", **kw}


INVALID = [
    # (spec, field named first, substring of the message)
    ({}, "kind", "kind: required; one of train, eval, tune"),
    ({"kind": "predict"}, "kind", "kind: must be one of train, eval, tune (got 'predict')"),
    ("{not json", "spec", "spec: not valid JSON"),
    ("[1, 2]", "spec", "spec: must be a JSON object"),
    (train(model="vgg16"), "model",
     "model: must be one of 'c8cnn', 'capsnet', 'effcaps', 'lenet5', 'resnet' (got 'vgg16')"),
    (train(gpus=65), "gpus", "gpus: must be an integer in 0..64 or a fraction in (0, 1) (got 65)"),
    (train(gpus=-1), "gpus", "gpus: must be an integer in 0..64 or a fraction in (0, 1) (got -1)"),
    (train(gpus="2"), "gpus", "gpus: must be an integer in 0..64 or a fraction in (0, 1) (got '2')"),
    (train(gpus=True), "gpus", "gpus: must be an integer in 0..64 or a fraction in (0, 1) (got True)"),
    (train(cpu_ranks=0), "cpu_ranks", "cpu_ranks: must be an integer in 1..64 (got 0)"),
    (train(workers=65), "cpu_ranks", "cpu_ranks: must be an integer in 1..64 (got 65)"),
    (train(workers=2, cpu_ranks=2), "workers", "workers: the old name of cpu_ranks; give only cpu_ranks"),
    (train(gpus=2, cpu_ranks=3), "cpu_ranks", "cpu_ranks: with gpus > 0 there is one rank per GPU"),
    (train(epochs=0), "epochs", "epochs: must be an integer in 1..1000 (got 0)"),
    (train(epochs=2.5), "epochs", "epochs: must be an integer in 1..1000 (got 2.5)"),
    (train(batch_size=70000), "batch_size", "batch_size: must be an integer in 1..65536 (got 70000)"),
    (train(cpu_ranks=4, batch_size=2), "batch_size", "batch_size: must be at least the number of ranks (4), got 2"),
    (train(lr=0), "lr", "lr: must be a number in (0, 1] (got 0)"),
    (train(lr=1.5), "lr", "lr: must be a number in (0, 1] (got 1.5)"),
    (train(lr_decay=0.0), "lr_decay", "lr_decay: must be a number in (0, 1] (got 0.0)"),
    (train(augment="rot500"), "augment", "augment: rotation range of 500.0 degrees in 'rot500' is outside [0, 180]"),
    (train(augment="blur3"), "augment", "augment: unknown augmentation 'blur3'"),
    (train(augment="none+shift2"), "augment", "combines 'none' with other parts"),
    (train(eval_angles=[0, 15, 15]), "eval_angles", "eval_angles: duplicate angle 15"),
    (train(eval_angles=[]), "eval_angles", "eval_angles: must list at least one angle"),
    (train(eval_angles=[200]), "eval_angles", "eval_angles: angle 200 is outside [-180, 180]"),
    (train(eval_angles=list(range(33))), "eval_angles", "eval_angles: at most 32 angles allowed (got 33)"),
    (train(eval_angles=[0, "a"]), "eval_angles[1]", "eval_angles[1]: must be a number in [-180, 180] (got 'a')"),
    (train(eval_angles=15), "eval_angles", "eval_angles: must be a list of 1..32 numbers in [-180, 180]"),
    (train(dataset="cifar10"), "dataset", "dataset: must be one of 'mnist', 'fashion-mnist' (got 'cifar10')"),
    (train(priority="urgent"), "priority", "priority: must be one of 'high', 'normal', 'low' (got 'urgent')"),
    (train(name="x" * 101), "name", "name: at most 100 characters allowed (got 101)"),
    (train(name="a\nb"), "name", "name: must not contain control characters"),
    (train(max_retries=21), "max_retries", "max_retries: must be an integer in 0..20 (got 21)"),
    (train(train_subset=0), "train_subset", "train_subset: must be an integer in 1..60000 or null (got 0)"),
    (train(test_subset=10001), "test_subset", "test_subset: must be an integer in 1..10000 or null (got 10001)"),
    (train(seed=-1), "seed", "seed: must be an integer in 0..4294967295 (got -1)"),
    (train(asha=True), "asha", "asha: unknown field for a train job; allowed: augment, batch_size"),
    (train(model_config={"widht": 3}), "model_config.widht", "model_config.widht: unknown capsnet config field; known:"),
    (train(model="lenet5", model_config={"conv_channels": 16}), "model_config.conv_channels",
     "model_config.conv_channels: unknown lenet5 config field"),
    (train(model_config={"conv_channels": 0}), "model_config.conv_channels",
     "model_config.conv_channels: capsnet expects an integer in 1..65536 (got 0)"),
    (train(model_config={"decoder": "yes"}), "model_config.decoder",
     "model_config.decoder: capsnet expects true or false (got 'yes')"),
    (train(model_config={"decoder_hidden": [512]}), "model_config.decoder_hidden",
     "model_config.decoder_hidden: capsnet expects a list of 2 integers"),
    (train(model_config={"primary_conv": "winograd"}), "model_config.primary_conv",
     "model_config.primary_conv: capsnet expects one of auto, direct, fft (got 'winograd')"),
    ({"kind": "eval"}, "source", "source: required; a job id or a checkpoint path"),
    ({"kind": "eval", "source": "   "}, "source", "source: must be a job id (j-...) or a checkpoint path"),
    ({"kind": "eval", "source": "j-1", "angles": [10, 10.0]}, "angles", "angles: duplicate angle 10"),
    ({"kind": "eval", "source": "j-1", "epochs": 3}, "epochs", "epochs: unknown field for a eval job"),
    (tune(models=[]), "models", "models: must list at least one model (c8cnn, capsnet, effcaps, lenet5, resnet)"),
    (tune(models=["capsnet", "capsnet"]), "models", "models: duplicate model capsnet"),
    (tune(models=["vgg"]), "models[0]", "models[0]: must be one of 'c8cnn', 'capsnet', 'effcaps', 'lenet5', 'resnet' (got 'vgg')"),
    (tune(augment=["shift2"]), "augment", "augment: must list one preset per training angle (3 angles, got 1 presets)"),
    (tune(augment=["shift2", "wobble", "none"]), "augment[1]", "augment[1]: unknown augmentation 'wobble'"),
    (tune(lr=[0.1, 2]), "lr[1]", "lr[1]: must be a number in (0, 1] (got 2)"),
    (tune(lr=[]), "lr", "lr: must list at least one value, or be left out"),
    (tune(lr=[0.01, 0.01]), "lr", "lr: duplicate value 0.01"),
    (tune(routing_iters=[0]), "routing_iters[0]", "routing_iters[0]: must be an integer in 1..10 (got 0)"),
    (tune(models=["lenet5"], routing_iters=[3]), "routing_iters", "routing_iters: only applies to capsnet"),
    (tune(seeds=11), "seeds", "seeds: must be an integer in 1..10 (got 11)"),
    (tune(samples=0), "samples", "samples: must be an integer in 1..1000 (got 0)"),
    (tune(samples=1000, seeds=10), "samples", "samples: the search has 60000 trials, more than the 5000 allowed"),
    (tune(gpus_per_trial=9), "gpus_per_trial", "gpus_per_trial: must be an integer in 0..8 or a fraction in (0, 1) (got 9)"),
    (tune(max_concurrent=0), "max_concurrent", "max_concurrent: must be an integer in 1..64 (got 0)"),
    (tune(asha="yes"), "asha", "asha: must be true or false (got 'yes')"),
    (tune(model_config={"nope": 1}), "model_config.nope", "model_config.nope: unknown capsnet/lenet5 config field"),
    (tune(models=["lenet5"], model_config={"capsnet": {"conv_channels": 8}}), "model_config.capsnet",
     "model_config.capsnet: capsnet is not a model of this job"),
]


@pytest.mark.parametrize(("spec", "field", "message"), INVALID,
                         ids=[f"{i:02d}-{case[1]}" for i, case in enumerate(INVALID)])
def test_invalid_spec_rejected_with_specific_message(spec, field, message):
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith(field + ":")
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_invalid_messages_are_distinct():
    messages = set()
    for spec, _, _ in INVALID:
        with pytest.raises(SpecError) as info:
            parse_spec(spec)
        messages.add(str(info.value))
    assert len(messages) == len(INVALID) >= 20


VALID = [
    train(),
    train(model="lenet5", gpus=2, cpu_ranks=2, epochs=3, batch_size=64, lr=0.01, lr_decay=0.95,
          augment="shift2+rot15+scale0.9-1.1", eval_angles=[-45, 0, 12.5, 45], dataset="fashion-mnist",
          seed=7, priority="high", name="lenet rot15", max_retries=0, train_subset=512, test_subset=256),
    train(model_config=TINY, train_subset=64, test_subset=64, epochs=1),
    train(model="lenet5", model_config={"conv1_channels": 4, "hidden1": 32}),
    {"kind": "eval", "source": "j-m3x9k2a1-4f7qzz", "angles": [-90, 0, 90], "test_subset": 100},
    {"kind": "eval", "source": "/tmp/ckpt/model.pt", "priority": "low"},
    tune(),
    tune(models=["capsnet"], angles=[0, 30], lr=[1e-3, 3e-3], routing_iters=[1, 3], seeds=2, samples=2,
         gpus_per_trial=1, max_concurrent=4, asha=False, model_config={"capsnet": TINY}),
]


@pytest.mark.parametrize("data", VALID)
def test_valid_specs_round_trip_through_json(data):
    spec = parse_spec(data)
    text = spec.to_json()
    again = parse_spec(text)
    assert again == spec
    assert json.loads(text) == spec.to_dict()
    assert parse_spec(json.loads(text)) == spec
    assert parse_spec(spec) is spec


def test_defaults_and_resources():
    s = parse_spec(train())
    assert isinstance(s, TrainSpec)
    assert (s.model, s.gpus, s.cpu_ranks, s.epochs, s.batch_size, s.lr, s.augment) == ("capsnet", 0, 1, 10, 128, 1e-3, "shift2")
    assert s.eval_angles == [0.0, 15.0, 35.0]
    assert s.resources() == {"gpus": 0, "cpus": 1}
    assert parse_spec(train(cpu_ranks=4)).resources() == {"gpus": 0, "cpus": 4}
    assert parse_spec(train(gpus=2)).resources() == {"gpus": 2, "cpus": 2}
    assert parse_spec(train(gpus=2)).ranks == 2
    e = parse_spec({"kind": "eval", "source": "j-m3x9k2a1-4f7qzz"})
    assert isinstance(e, EvalSpec) and e.source_job == "j-m3x9k2a1-4f7qzz"
    assert e.resources() == {"gpus": 0, "cpus": 1}
    assert parse_spec({"kind": "eval", "source": "runs/a.pt"}).source_job is None


def test_tune_defaults_follow_angles():
    t = parse_spec(tune(angles=[0, 15, -35.5]))
    assert isinstance(t, TuneSpec)
    assert t.models == ["capsnet", "lenet5"]
    assert t.eval_angles == [0.0, 15.0, -35.5]
    assert t.augment == ["shift2", "shift2+rot15", "shift2+rot35.5"]
    assert t.conditions() == [(0.0, "shift2"), (15.0, "shift2+rot15"), (-35.5, "shift2+rot35.5")]
    assert t.num_trials() == 6
    assert t.resources() == {"gpus": 0, "cpus": 2}
    big = parse_spec(tune(models=["capsnet"], angles=[0], routing_iters=[1, 2, 3], gpus_per_trial=1,
                          max_concurrent=8))
    assert big.num_trials() == 3
    assert big.resources() == {"gpus": 3, "cpus": 3}  # never more than the trials there are
    assert big.label == "capsnet"
    assert t.label == "capsnet+lenet5"


def test_model_config_alias_and_kwargs():
    s = parse_spec(train(model_config=TINY))
    assert s.model_overrides == TINY
    assert s.model_kwargs() == TINY
    assert s.to_dict()["model_config"] == TINY
    t = parse_spec(tune(model_config=TINY))  # flat: applies to the models that have the fields
    assert t.model_kwargs("capsnet") == TINY and t.model_kwargs("lenet5") == {}
    t2 = parse_spec(tune(model_config={"lenet5": {"hidden1": 10}}))
    assert t2.model_kwargs("lenet5") == {"hidden1": 10} and t2.model_kwargs("capsnet") == {}


def test_model_config_overrides_build_a_model():
    from capsnet_core.models import build_model

    s = parse_spec(train(model_config=TINY))
    model = build_model(s.model, **s.model_kwargs())
    assert model.config.conv_channels == 16
    for choice in ("auto", "direct", "fft"):  # every allowed choice passes validation and builds
        s = parse_spec(train(model_config={**TINY, "primary_conv": choice}))
        assert build_model(s.model, **s.model_kwargs()).config.primary_conv == choice


def test_json_schema_covers_all_kinds():
    for model, kind, field in ((TrainSpec, "train", "eval_angles"), (EvalSpec, "eval", "angles"),
                               (TuneSpec, "tune", "gpus_per_trial")):
        schema = model.model_json_schema(by_alias=True)
        assert schema["title"] == model.__name__ and schema["properties"]["kind"]["const"] == kind
        assert field in schema["properties"] and schema["additionalProperties"] is False
    assert "model_config" in TrainSpec.model_json_schema(by_alias=True)["properties"]
    assert TuneSpec.model_json_schema(by_alias=True)["properties"]["max_concurrent"]["maximum"] == 64
