"""Model presets (one JSON file per preset) and the bundled default model.

Installed as the data package `lbdl_cli.presets`; lbdl_cli.checkpoint finds them
(`preset_names`, `load_preset`, `default_model_dir`).
"""
