"""P3S Adapter Loader / Save nodes: adapters are safetensors files in ``models/p3s``."""
from __future__ import annotations

import os

from .common import ADAPTER, CATEGORY
from .paths import adapter_folders, list_adapters, save_folder


#: Names Windows reserves for devices, with or without an extension ("con", "NUL.safetensors").
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
                             | {f"{d}{i}" for d in ("COM", "LPT") for i in (*range(10), "\u00b9", "\u00b2", "\u00b3")})
#: Characters Windows (and, for ':', macOS) does not allow in a file name.
FORBIDDEN_CHARS = '<>:"|?*'
MAX_NAME_BYTES = 200


def check_adapter_name(name: str, input_name: str) -> str:
    """A plain file name for ``models/p3s`` that is valid on Linux, Windows AND macOS.

    Refused on every platform (so a workflow made on Linux works on Windows): folders, '..',
    hidden names, control characters, the characters ``<>:"|?*``, a leading or trailing space
    or a trailing dot (Windows drops those), reserved device names (``con``, ``nul``, ``com1``,
    ``lpt1`` ... with or without an extension), names over 200 bytes.
    """
    from ..p3s_core.errors import AdapterFileError

    name = str(name)
    simple = "use a simple name such as 'my_dog' (letters, digits, '-', '_'); files go to models/p3s"
    stripped = name.strip()
    if (not stripped or "/" in name or "\\" in name or ".." in name or ":" in name
            or stripped.startswith(".")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise AdapterFileError(input_name, f"{name!r} is not a plain file name (no folders, no '..', no ':', "
                               "no control characters, not hidden)", simple)
    bad = sorted({c for c in name if c in FORBIDDEN_CHARS})
    if bad:
        raise AdapterFileError(input_name, f"{name!r} contains {' '.join(bad)}, which Windows does not allow "
                               "in file names (':' not on macOS either)", simple)
    if name != stripped or name.endswith("."):
        raise AdapterFileError(input_name, f"{name!r} starts or ends with a space or ends with a dot, which "
                               "Windows drops from file names", simple)
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    if stem in WINDOWS_RESERVED:
        raise AdapterFileError(input_name, f"{name!r} is a reserved device name on Windows (CON, PRN, AUX, NUL, "
                               "COM0-9, LPT0-9, also with an extension)", simple)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise AdapterFileError(input_name, f"the name is {len(name.encode('utf-8'))} bytes long (at most "
                               f"{MAX_NAME_BYTES})", "use a shorter name such as 'my_dog'")
    return name


def adapter_file_name(name: str, input_name: str) -> str:
    """The checked name with ``.safetensors`` added: where the Save node and the Trainer write."""
    name = check_adapter_name(name, input_name)
    return name if name.endswith(".safetensors") else name + ".safetensors"


def check_adapter(adapter, input_name: str = "adapter"):
    """A P3S adapter object (from P3S Adapter Loader or P3S Trainer), or a clear error."""
    from ..p3s_core.adapter import P3SAdapter
    from ..p3s_core.errors import AdapterFileError

    if not isinstance(adapter, P3SAdapter):
        raise AdapterFileError(input_name, f"expected a P3S adapter, got a {type(adapter).__name__}",
                               "connect the output of P3S Adapter Loader or P3S Trainer")
    return adapter


def resolve_adapter(name: str) -> str:
    """The full path of an adapter in the p3s folders, or an error listing the folders searched."""
    import folder_paths

    from ..p3s_core.errors import AdapterFileError

    name = str(name).strip()
    if name not in list_adapters():  # names the dropdown lists may sit in subfolders ("sub/x.safetensors")
        name = check_adapter_name(name, "adapter_name")
    path = folder_paths.get_full_path("p3s", name)
    if path is None or not os.path.isfile(path):
        raise AdapterFileError("adapter_name", f"'{name}' was not found; searched: {', '.join(adapter_folders())}",
                               "put the .safetensors file in one of those folders (or train one with P3S Trainer) and press R to refresh")
    return path


class P3SAdapterLoader:
    DESCRIPTION = "Loads a P3S adapter (safetensors) from models/p3s, checking that it was made for SD1.5 by a compatible P3S version."
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["load adapter", "subject", "personalize", "dreambooth"]  # the words users type in the node search
    FUNCTION = "load"
    RETURN_TYPES = (ADAPTER,)
    OUTPUT_TOOLTIPS = ("The adapter, for the P3S Condition Injector or to resume training.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"adapter_name": (list_adapters(), {"tooltip": "An adapter file in models/p3s (or a 'p3s:' folder of extra_model_paths.yaml)."})}}

    def load(self, adapter_name):
        from ..p3s_core.adapter import load_adapter
        from ..p3s_core.errors import AdapterFileError

        path = resolve_adapter(adapter_name)
        try:
            adapter = load_adapter(path)
        except AdapterFileError as exc:  # the core names the path; the user knows the widget
            raise AdapterFileError("adapter_name", f"'{adapter_name}' ({path}): {exc.problem}", exc.fix) from exc
        return (adapter,)


class P3SAdapterSave:
    DESCRIPTION = "Saves a P3S adapter to models/p3s as safetensors (atomically: a crash never leaves a half-written file)."
    CATEGORY = CATEGORY
    SEARCH_ALIASES = ["save adapter", "subject"]  # the words users type in the node search
    FUNCTION = "save"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("adapter_name",)
    OUTPUT_NODE = True
    OUTPUT_TOOLTIPS = ("The saved file's name, for P3S Adapter Loader.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter": (ADAPTER, {"tooltip": "The adapter to save."}),
            "name": ("STRING", {"default": "p3s_adapter", "tooltip": "File name in models/p3s ('.safetensors' is added). An existing file is replaced."}),
        }}

    def save(self, adapter, name):
        from ..p3s_core.adapter import save_adapter

        from ..p3s_core.adapter import check_finite

        check_adapter(adapter, "adapter")
        name = adapter_file_name(name, "name")
        check_finite(adapter.state_dict(), "adapter", "the adapter",  # before any file is touched
                     "do not save it: train again with a lower learning_rate (or load the last good save)")
        path = save_adapter(adapter, os.path.join(save_folder(), name))
        return {"ui": {"text": [str(path)]}, "result": (name,)}
