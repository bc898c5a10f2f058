"""Function-calling examples in OpenAI's fine-tuning format, shared by the tool-calling tests."""

from __future__ import annotations

import json

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CITIES = ["Paris", "Oslo", "Lima"]


def call(city: str, call_id: str = "call_1") -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


def weather_example(city: str, **calling: object) -> dict:
    """Asked the weather in `city`, the assistant calls get_weather, reads the result, answers."""
    return {
        "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call(city)], **calling},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "assistant", "content": f"18C in {city}."},
        ],
        "tools": [WEATHER_TOOL],
    }


def weather_preference(city: str, other: str = "Rome") -> dict:
    """A preference pair: asked the weather in `city`, the call for `city` is preferred to
    one for `other`."""
    return {
        "input": {
            "messages": [{"role": "user", "content": f"Weather in {city}?"}],
            "tools": [WEATHER_TOOL],
        },
        "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call(city)]}],
        "non_preferred_output": [{"role": "assistant", "tool_calls": [call(other)]}],
    }


def weather_rows() -> list[dict]:
    """One tool-calling example per city: the data the tests train a tiny model on."""
    return [weather_example(city) for city in CITIES]


# 150 steps of one example (about 330 tokens: the tools are listed): with these the tiny model
# learns the <tool_call> layout (not always which city goes with which question)
WEATHER_HYPERPARAMETERS = {"n_epochs": 50, "batch_size": 1, "learning_rate": 6e-3, "lora_r": 16}
WEATHER_QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
