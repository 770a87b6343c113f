"""The example specs, shipped inside the wheel so `load_spec("quickstart")` works from anywhere."""
