"""Model profiles: a named model setup (base model, template, defaults, tasks) kept as a TOML file."""
