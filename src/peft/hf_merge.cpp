// Placeholder: filled in by the CLI work.
