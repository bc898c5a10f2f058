"""The `loraforge` command: `main` holds the commands, `demo` the end-to-end demo it runs."""
