"""Events are the one currency: they must round-trip through JSON exactly."""

import json

import pytest

import aiaas_lab
from aiaas_lab import CheckpointSaved, EpochEnd, RunEnded, RunStarted, StepEnd, event_from_dict, event_from_json

EXAMPLES = [
    RunStarted(run_id="r1", epochs=3, start_epoch=0, steps_per_epoch=10, batch_size=64, train_samples=640,
               val_samples=0, task="classification", num_classes=10, hyperparameters={"lr": 0.01}, time=1.5),
    StepEnd(epoch=1, step=4, epoch_step=4, loss=0.25, samples=256, time=2.0),
    EpochEnd(epoch=1, step=10, metrics={"loss": 0.3, "accuracy": 0.9}, seconds=0.5, samples_per_s=1280.0, time=2.5),
    CheckpointSaved(epoch=1, path="/tmp/x/checkpoint.safetensors", time=2.6),
    RunEnded(status="stopped", epochs_completed=1, steps=12, seconds=1.0, reason="stop requested", time=3.0),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.type)
def test_round_trip_through_json(event):
    text = event.to_json()
    assert json.loads(text)["type"] == event.type
    assert event_from_json(text) == event
    assert event_from_dict(event.to_dict()) == event


def test_events_are_frozen():
    with pytest.raises(Exception):
        EXAMPLES[1].loss = 1.0  # type: ignore[misc]


def test_unknown_type_and_extra_keys():
    with pytest.raises(ValueError, match="unknown event type"):
        event_from_dict({"type": "nope"})
    data = EXAMPLES[1].to_dict() | {"added_in_a_later_version": 1}
    assert event_from_dict(data) == EXAMPLES[1]


def test_public_names():
    assert set(aiaas_lab.__all__) >= {"train", "predict", "TrainResult", "StopSignal", "RunStarted", "StepEnd",
                                      "EpochEnd", "RunEnded", "event_from_dict", "load_ipython_extension"}
    for name in aiaas_lab.__all__:
        assert hasattr(aiaas_lab, name), name
