"""Model presets (one JSON file per preset) and the bundled default model.

Installed as the data package `lbdl_cli.presets`; found by lbdl_cli/checkpoint/__init__.py (`preset_names`, `load_preset`, `default_model_dir`).
"""
