"""Model presets (one JSON file per preset) and the bundled default model.

Installed as the data package `lbdl_cli.presets`; see lbdl_cli/checkpoint.py.
"""
