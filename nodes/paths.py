"""The ``p3s`` models folder and adapter-name resolution (ComfyUI's ``folder_paths``)."""
from __future__ import annotations

import os

FOLDER_NAME = "p3s"
# Adapters are safetensors only: listing .ckpt/.pt (pickles) would offer files the pack refuses.
EXTENSIONS = {".safetensors"}


def register_model_folder() -> None:
    """Register ``models/p3s`` the way IPAdapter does, keeping ``extra_model_paths.yaml`` entries.

    ``extra_model_paths.yaml`` is applied before custom nodes load, so a ``p3s:`` entry there is
    already in ``folder_names_and_paths``: keep its paths, set our extensions.
    """
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    if FOLDER_NAME in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[FOLDER_NAME]
        paths = list(paths)
    else:
        paths = [default]
    folder_paths.folder_names_and_paths[FOLDER_NAME] = (paths, set(EXTENSIONS))


def adapter_folders() -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths(FOLDER_NAME))


def list_adapters() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(FOLDER_NAME)


def save_folder() -> str:
    """The first ``p3s`` folder: where the Trainer and Adapter Save write."""
    folder = adapter_folders()[0]
    os.makedirs(folder, exist_ok=True)
    return folder
