"""The contract between dinofeat's client and server, imported by both and importing neither.

- `computation`: `FeatureComputation`, the one description of a feature computation, and its defaults.
- `feature_sets`: the sets a server offers, known without asking one.
- `wire`: the HDF5 layout of streamed datasets, chunk encoding, checksums and result keys.
- `chunk_batches`: several chunks per streamed message.
- `images`: what an image, its labels and masks must be; an image's content address.
- `errors`: `DinofeatError`, whose message users see as is.
- `outputs`: where outputs go and how they are written (atomically, one sentence per failure).
- `tokens`: access-token and TLS credential files.
- `local_server`: the files of a user's local server (socket, lock, log, info file), the one owner of that protocol.
- `durations`: durations said the way people say them.
"""
