"""The adapter registry: `service` records, lists and deletes models and their checkpoints;
`download` packs an adapter for download."""
