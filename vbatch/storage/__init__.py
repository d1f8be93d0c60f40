"""Where bytes live: local paths and object-store URIs as filesystems (storage/filesystem.py).
Knows nothing of models, rows or jobs; io/ and engine/loader/ both build on it."""
