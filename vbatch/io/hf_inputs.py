"""`hf://NAME[:SPLIT]` inputs: a Hugging Face dataset, read from the Arrow files `datasets` keeps.

`datasets.load_dataset(NAME, split=SPLIT)` downloads (or, offline, finds in the local cache) the
dataset and stores it as Arrow files; vbatch then reads those files like any `save_to_disk`
folder, so the rest of the job does not know where the rows came from. NAME is a hub id
(`openai/gsm8k`) or anything else `load_dataset` accepts (a local folder of data files). With
`HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1` only the local cache is used.
"""
from __future__ import annotations

from pathlib import Path

from vbatch.errors import InputError, one_line
from vbatch.io.formats import count_rows

HF_SCHEME = "hf://"


def is_hf_uri(text: str) -> bool:
    """True for `hf://...` inputs."""
    return text.startswith(HF_SCHEME)


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """`hf://NAME[:SPLIT]` -> (NAME, SPLIT or None). Raises InputError for an empty NAME/SPLIT."""
    body = uri[len(HF_SCHEME):]
    name, _, split = body.rpartition(":") if ":" in body else (body, "", "")
    if not name.strip() or (":" in body and not split.strip()):
        raise InputError(f"{uri}: expected hf://NAME or hf://NAME:SPLIT (e.g. hf://openai/gsm8k:test)")
    return name, (split or None)


def hf_output_name(uri: str) -> str:
    """The default output directory name of an `hf://` input: `NAME[-SPLIT].vbatch` with only
    the last path component of NAME (`hf://openai/gsm8k:test` -> `gsm8k-test.vbatch`)."""
    name, split = parse_hf_uri(uri)
    stem = Path(name.rstrip("/")).name or "dataset"
    return f"{stem}-{split}.vbatch" if split else f"{stem}.vbatch"


def hf_dataset_files(uri: str) -> list[Path]:
    """Load `hf://NAME[:SPLIT]` with `datasets.load_dataset` and return its Arrow files, in
    order. Without SPLIT the dataset must have exactly one split. Raises InputError (one line)
    when the dataset cannot be loaded, has several splits and none was named, or lives only in
    memory."""
    import datasets  # noqa: PLC0415 - start-up: slow to import, only hf:// inputs need it

    name, split = parse_hf_uri(uri)
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; report one line
        detail = one_line(error, 300)
        raise InputError(f"{uri}: cannot load the dataset ({detail}); offline, only datasets "
                         "already in the local Hugging Face cache can be read") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            raise InputError(f"{uri}: the dataset has splits {', '.join(splits)}; pick one with "
                             f"hf://{name}:SPLIT")
        loaded = loaded[splits[0]]
    if not isinstance(loaded, datasets.Dataset):
        raise InputError(f"{uri}: load_dataset returned a {type(loaded).__name__}, not a Dataset")
    files = [Path(entry["filename"]) for entry in loaded.cache_files]
    if not files:
        raise InputError(f"{uri}: the dataset is held in memory only (no Arrow cache files); "
                         "save it with save_to_disk and pass that folder")
    if count_rows(files) != loaded.num_rows:   # a slice such as train[:10%] maps into the files
        raise InputError(f"{uri}: split slices are not supported; name a whole split")
    return files
