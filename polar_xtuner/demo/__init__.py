"""The tiny model and demo data that `make demo` and the tests use."""
