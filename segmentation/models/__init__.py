"""The three architectures. Each module imports its framework; import only the one you need."""
