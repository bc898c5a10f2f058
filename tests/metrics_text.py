"""Reading a Prometheus scrape in tests, with prometheus-client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of every sample in the scrape (the parser refuses a
    malformed one)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scrape: dict, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return scrape.get((name, frozenset(labels.items())), 0.0)


def labels_of(scrape: dict, name: str, label: str, **where: str) -> set[str]:
    """The values `label` takes in the samples of `name` that match `where`."""
    return {
        dict(found)[label]
        for (sample, found), _ in scrape.items()
        if sample == name and set(where.items()) <= set(found)
    }
