// Placeholder: CLI tests.
