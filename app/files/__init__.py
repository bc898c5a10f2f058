"""Uploaded files: `service` stores, lists and deletes them; `format` checks a dataset's lines."""
